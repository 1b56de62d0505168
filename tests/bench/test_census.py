"""The mask census (``safe-dit audit --zoo``): its mask kinds, and what it finds on the classes the issue names."""

import torch

from safe_dit.inspection.census import census_one, mask_kind, recipe_for

Q, K = (2, 4, 6, 8), (2, 4, 5, 8)  # [B, H, Lq, d], [B, H, Lk, d]


def test_mask_kinds():
    assert mask_kind(None, Q, K) == "none"
    assert mask_kind(torch.ones(2, 1, 1, 5, dtype=torch.bool), Q, K) == "all-valid"
    assert mask_kind(torch.zeros(2, 1, 1, 5), Q, K) == "all-valid"
    assert mask_kind(torch.full((2, 1, 6, 5), 3.0), Q, K) == "row-constant"
    padding = torch.arange(5)[None] < torch.tensor([5, 2])[:, None]  # [B, Lk]
    assert mask_kind(padding[:, None, None], Q, K) == "key-padding"
    assert mask_kind(torch.where(padding, 0.0, -10000.0)[:, None, None], Q, K) == "key-padding"
    # a 0/1 float mask is a bias, not padding; one constant over the queries is a rank-1 bias 1 * m_j
    assert mask_kind(padding.float()[:, None, None], Q, K) == "rank-1 bias"
    causal = torch.ones(6, 5, dtype=torch.bool).tril()
    assert mask_kind(causal, Q, K) == "other"
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [1.0] * 5])  # Chroma's float m, outer product m_i m_j
    assert mask_kind((m[:, None, :, None] * m[:, None, None, :]), (2, 4, 5, 8), K) == "rank-1 bias"
    assert mask_kind(torch.rand(2, 1, 5, 5) - 0.5, (2, 4, 5, 8), K) == "other"  # a general bias is not


def _kinds(row, setting):
    return [c["kind"] for c in row["settings"][setting]["calls"]]


def test_lumina2_passes_key_padding_in_three_of_four_calls_for_a_cfg_batch():
    row = census_one(recipe_for("Lumina2Transformer2DModel"), grid=(4, 4))
    assert "error" not in row
    assert _kinds(row, 0) == ["all-valid", "none", "none", "none"]  # batch 1: the caption refiner's all-ones mask
    assert _kinds(row, 2) == ["key-padding", "none", "key-padding", "key-padding"]  # CFG batch, different captions
    assert [s["dense_fp_masked_calls"] for s in row["settings"]] == [0, 0, 0]  # safe-dit's dense-fp: none left


def test_qwen_image_masks_only_when_captions_differ():
    row = census_one(recipe_for("QwenImageTransformer2DModel"), grid=(4, 4))
    assert set(_kinds(row, 0)) == {"none"} and set(_kinds(row, 2)) == {"key-padding"}


def test_chroma_and_z_image_need_no_mask_under_safe_dit():
    """Chroma's float m_i m_j is a rank-1 bias (exactly removable), Z-Image's key padding; safe-dit's dense-fp leaves
    no masked call on either, and both take safe-core."""
    for cls, kind in (("ChromaTransformer2DModel", "rank-1 bias"), ("ZImageTransformer2DModel", "key-padding")):
        row = census_one(recipe_for(cls), grid=(4, 4))
        assert "error" not in row and kind in _kinds(row, 2)
        assert [s["dense_fp_masked_calls"] for s in row["settings"]] == [0, 0, 0]
        assert "safe-core" in row["safe_dit_modes"]
