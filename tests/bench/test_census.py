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


def test_pair_mask_kind():
    """HunyuanVideo's m_i & m_j (its refiner also lets padding rows see key 0) is a pair mask; a mask whose padding
    row sees a padding key, or whose valid rows differ, is not."""
    v = torch.tensor([[True, True, True, False, False], [True] * 5])  # [B, S]
    pair = v[:, None, :, None] & v[:, None, None, :]  # [B, 1, S, S]
    sq = (2, 4, 5, 8)
    assert mask_kind(pair, sq, K) == "pair"
    refiner = pair.clone()
    refiner[..., 0] = True
    assert mask_kind(refiner, sq, K) == "pair"
    leaky = pair.clone()
    leaky[0, 0, 4, 3] = True  # a padding query reads a padding key
    assert mask_kind(leaky, sq, K) == "other"
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert mask_kind(causal, sq, K) == "other"


NAMED_VIDEO = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "HunyuanVideo15Transformer3DModel",
               "LTXVideoTransformer3DModel", "CogVideoXTransformer3DModel", "MochiTransformer3DModel",
               "SkyReelsV2Transformer3DModel")


def test_every_video_class_is_built_or_listed_with_its_reason():
    from safe_dit.inspection.recipes import recipes
    from safe_dit.inspection.recipes_video import WHY_NOT_BUILT, video_transformer_classes

    video = set(video_transformer_classes())
    built = {r.cls for r in recipes()} & video
    assert set(NAMED_VIDEO) <= built
    assert video - built == set(WHY_NOT_BUILT)  # the rest, each with a reason
    assert all(WHY_NOT_BUILT[c] for c in WHY_NOT_BUILT)


def test_committed_census_covers_the_video_classes():
    import json
    import pathlib

    import diffusers
    import pytest

    from safe_dit.inspection.recipes import recipes
    from safe_dit.inspection.recipes_video import WHY_NOT_BUILT, video_transformer_classes

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "results" / "census.json"
    result = json.loads(path.read_text())
    if result["environment"]["diffusers"] != diffusers.__version__:
        pytest.skip(f"the committed census is of diffusers {result['environment']['diffusers']}")
    summary = {s["class"]: s for s in result["summary"]}
    with_recipe = {r.cls for r in recipes()}
    for cls in video_transformer_classes():
        s = summary[cls]
        assert s["video"], cls
        if cls in with_recipe:  # built: its three settings recorded
            assert s["error"] is None and len(s["settings"]) == 3, cls
        else:
            assert s["error"] == f"not built: {WHY_NOT_BUILT[cls]}", cls
    assert all(summary[cls]["settings"] for cls in NAMED_VIDEO)


def test_video_masks_stock_and_under_dense_fp():
    """Stock HunyuanVideo 1.5 passes [B, 1, S, S] pair masks, HunyuanVideo 1.0 [B, 1, 1, N] key padding, LTX-Video its
    caption key-padding bias to cross-attention, Wan none; safe-dit's dense-fp leaves no masked call."""
    expect = {"HunyuanVideo15Transformer3DModel": {"pair"}, "HunyuanVideoTransformer3DModel": {"key-padding", "pair"},
              "LTXVideoTransformer3DModel": {"none", "key-padding"}, "WanTransformer3DModel": {"none"}}
    for cls, kinds in expect.items():
        row = census_one(recipe_for(cls), grid=(4, 4))
        assert "error" not in row, row.get("error")
        assert set(_kinds(row, 2)) == kinds, cls
        fp = [s["dense_fp_masked_calls"] for s in row["settings"]]
        assert fp == ([None] * 3 if cls.startswith("LTX") else [0, 0, 0]), cls
    pair = [c for c in census_one(recipe_for("HunyuanVideo15Transformer3DModel"), grid=(4, 4))["settings"][2]["calls"]
            if c["mask_shape"] and c["mask_shape"][2] == c["q"][2] and c["mask_shape"][1] == 1]
    assert pair and all(c["kind"] == "pair" for c in pair)
