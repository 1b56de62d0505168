"""Chroma (ChromaTransformer2DModel): what the stock model computes with ChromaPipeline's float 0/1 mask (an additive
bias, not masking), its exact mask-free form (one extra q/k channel), safe-core on it, and what is refused. The
whole-loop contract is in test_backbones."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.adapters.chroma import _rank_one
from safe_dit.cli import main
from safe_dit.inspection.audit import trace_forward
from safe_dit.testing.chroma import build_chroma, build_chroma_pipeline, build_chroma_text_pipeline, chroma_inputs

from helpers import RUNS, SdpaSpy, forward, selective_flops

run = RUNS["chroma"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _close(a, b, tol=1e-5):
    return (a - b).abs().max() <= tol * b.abs().max()


class FirstCall(TorchFunctionMode):
    """The query, key, value and mask of the first SDPA call."""

    def __init__(self):
        super().__init__()
        self.args = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.args is None:
            named = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
            self.args = tuple(named.get(n) for n in ("query", "key", "value", "attn_mask"))
        return func(*args, **kwargs)


def test_the_stock_float_mask_is_an_additive_bias_not_masking():
    """ChromaPipeline's mask is float: each block hands SDPA m_i m_j (+1 on valid pairs, 0 elsewhere), which SDPA adds
    to the logits. Padding keys keep e^-1 of their weight for a valid query (masking would give them none), and a
    padded query row is unbiased."""
    model = build_chroma()
    inputs = chroma_inputs(model, 4, 6, batch=2, text_len=12, valid_lens=[11, 3])
    m = inputs["attention_mask"]
    assert m.dtype == torch.float32
    with torch.no_grad(), FirstCall() as first:
        model(**inputs)
    q, k, v, bias = first.args  # [B, H, L, d]
    assert bias.dtype == torch.float32 and bias.shape == (2, 1, m.shape[1], m.shape[1])
    assert torch.equal(bias, m[:, None, None, :] * m[:, None, :, None])
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    stock = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).double()
    assert _close(stock, torch.softmax(logits + bias.double(), -1) @ v.double(), 1e-6)
    valid = m.bool()  # [B, L]
    masked = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), -1) @ v.double()
    rows = valid[:, None, :, None].expand_as(stock)
    assert (stock - masked)[rows].abs().max() > 0.05 * stock.abs().max()  # not what key masking computes
    w, w0 = torch.softmax(logits + bias.double(), -1), torch.softmax(logits, -1)
    query = 12 + 5  # an image query of sample 1 (4 valid caption tokens, 8 padding)
    ratio = w[1, 0, query] / w0[1, 0, query]
    pad_key, valid_key = (~valid[1]).nonzero()[0, 0], 0
    assert abs(float(ratio[pad_key] / ratio[valid_key]) - math.exp(-1)) < 1e-9
    assert torch.equal(bias[1, 0, pad_key], torch.zeros_like(bias[1, 0, pad_key]))  # a padded query row: no bias


@pytest.mark.parametrize("d", [24, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_rank_one_fold_is_the_bias_for_any_float_mask(d, dtype):
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(2, 40, 3, d, generator=g).to(dtype) for _ in range(3))  # [B, L, H, d]
    m = torch.rand(2, 40, generator=g) * 3 - 1  # any float values, not only 0/1
    scale = d ** -0.5
    q2, k2, v2 = _rank_one(q, k, v, m, scale)
    assert q2.shape[-1] % 8 == 0 and q2.shape[-1] > d
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # mask-free: the flash kernel takes it
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q2, k2, v2)), scale=scale)[..., :d]
    qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k, v))
    bias = (m[:, :, None] * m[:, None, :]).double()[:, None]  # [B, 1, L, L]
    ref = torch.softmax(qt @ kt.transpose(-1, -2) * scale + bias, -1) @ vt
    assert _close(out.double(), ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,lens", [(4, 6, [11, 3]), (3, 5, [5, 5]), (5, 3, [2]), (2, 2, [11, 11])],
                         ids=["different", "equal", "one", "no-padding"])
def test_dense_fp_equals_dense_with_no_mask_on_the_flash_kernel(h, w, lens, dtype):
    model = build_chroma(dtype=dtype)
    inputs = chroma_inputs(model, h, w, batch=len(lens), text_len=12, valid_lens=lens, seed=h * 10 + w)
    with SdpaSpy() as stock_spy:
        dense = forward(model, inputs).float()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    seen = []  # what the first block receives after safe-dit's pre-hook: a [B, 1] stand-in, not the mask
    hook = model.transformer_blocks[0].register_forward_pre_hook(
        lambda _b, _a, kw: seen.append(tuple(kw["attention_mask"].shape)), with_kwargs=True)
    verdicts = {c["verdict"] for c in trace_forward(model, inputs)}
    with SdpaSpy() as spy, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if a call needed another kernel
        fast = forward(model, inputs).float()
    hook.remove()
    remove_safe_dit(model)
    assert all(m is not None and m.dim() == 4 for m in stock_spy.masks)  # the stock blocks always pass m_i m_j
    assert spy.masks and all(m is None for m in spy.masks)
    assert seen[-1] == (len(lens), 1)
    padded = min(lens) < 11
    assert verdicts == {"rewritten: bias m_i m_j as one extra q/k channel (exact, no mask)" if padded
                        else "elided: a constant mask, row-constant bias m_i m_j"}
    assert _close(fast, dense, TOL[dtype])


def test_a_bool_mask_is_kept_as_shipped():
    """A user's bool mask is real masking in the stock blocks (their outer product is bool): kept, exact; the
    scheduled modes refuse it."""
    model = build_chroma()
    inputs = chroma_inputs(model, 3, 4, batch=2, text_len=12, valid_lens=[11, 3])
    inputs["attention_mask"] = inputs["attention_mask"].bool()
    dense = forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy:
        fast = forward(model, inputs)
    remove_safe_dit(model)
    assert spy.masks and all(m is not None and m.dtype == torch.bool for m in spy.masks)
    assert _close(fast, dense)
    apply_safe_dit(model, SafeConfig("safe-core", warmup_steps=1))
    with (pytest.raises(SafeDitError, match="float caption mask"), torch.no_grad(),
          safe_dit.generation(model, num_steps=2)):
        model(**inputs)
    remove_safe_dit(model)


def test_gradient_checkpointing_follows_the_stock_blocks():
    """Under gradient checkpointing the stock double blocks get the mask positionally and the single blocks none (a
    diffusers quirk: its checkpointed single-block call drops attention_mask); dense-fp follows both, gradients too."""
    model = build_chroma()
    model.enable_gradient_checkpointing()
    model.train()
    inputs = chroma_inputs(model, 3, 4, batch=2, text_len=12, valid_lens=[11, 3])

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(**inputs)[0]
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stock_out, stock = grads()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy:
        out, patched = grads()
    remove_safe_dit(model)
    assert all(m is None for m in spy.masks)
    assert _close(out, stock_out) and stock.keys() == patched.keys()
    assert all(torch.allclose(patched[n], stock[n], atol=1e-6, rtol=1e-5) for n in stock)


def _steps(model, steps_inputs, config):
    apply_safe_dit(model, config)
    with torch.no_grad(), safe_dit.generation(model, num_steps=len(steps_inputs)) as g, SdpaSpy() as spy:
        outs = [model(**inputs)[0] for inputs in steps_inputs]
    remove_safe_dit(model)
    return outs, g, spy


@pytest.mark.parametrize("lens,dtype",
                         [([11, 3], torch.float32), ([11, 11], torch.float32), ([11, 3], torch.bfloat16)],
                         ids=["padded", "no-padding", "padded-bf16"])
def test_safe_core_on_a_batch_of_two_captions(lens, dtype):
    model = build_chroma(dtype=dtype)
    base = chroma_inputs(model, 4, 6, batch=2, text_len=12, valid_lens=lens)
    steps = [dict(base, hidden_states=base["hidden_states"] * (1 - 0.1 * i)
                  + 0.1 * i * torch.randn_like(base["hidden_states"]), timestep=base["timestep"] * 0 + i / 6)
             for i in range(6)]
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense_fp = [forward(model, inputs) for inputs in steps]
    remove_safe_dit(model)
    sched = dict(warmup_steps=1, anchor_interval=3, tail_dense_steps=0, anchor_growth=0.0)
    full, g1, _ = _steps(model, steps, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, **sched))
    assert "selective" in g1.report()["steps"]
    assert all(_close(o.float(), d.float(), TOL[dtype]) for o, d in zip(full, dense_fp))  # keep 1 == dense-fp
    sparse, g2, spy = _steps(model, steps, SafeConfig("safe-core", keep_ratio=0.25, reuse_every=0, **sched))
    report = g2.report()
    assert report["steps"] == ["warmup", "selective", "selective", "anchor", "selective", "selective"]
    assert report["tokens_per_step"][1] == 6 and report["tokens_per_step"][0] == 24
    assert spy.masks and all(m is None for m in spy.masks)
    assert all(torch.isfinite(o).all() for o in sparse)
    assert not torch.allclose(sparse[1], dense_fp[1], atol=1e-4)  # context rows reuse the anchor
    assert _close(sparse[3].float(), dense_fp[3].float(), TOL[dtype])  # the anchor is a dense step


def test_pcsp_weighs_only_caption_words():
    """PCSP's caption weights from Chroma's mask: the padding, T5's </s> and the one padding token ChromaPipeline
    keeps valid weigh 0, the caption words 1."""
    model = build_chroma()
    apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=1, anchor_interval=3))
    runtime = safe_dit.api.runtime_of(model)
    valid = torch.tensor([[1.0] * 5 + [0.0] * 7])
    weights = runtime.text_weights(valid > 0, 12, "cpu")
    remove_safe_dit(model)
    assert weights[0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0] + [0.0] * 7


def test_selective_steps_do_a_fraction_of_the_work():
    model = build_chroma()
    flops = selective_flops(model, chroma_inputs(model, 8, 8, batch=1, text_len=12, valid_lens=[4]))
    assert flops[0.25] < 0.5 * flops[1.0]


def test_refusals_and_true_cfg_under_dense_fp():
    model = build_chroma()
    with pytest.raises(SafeDitError, match="safe-sw is not available for Chroma"):
        apply_safe_dit(model, SafeConfig("safe-sw"))
    with pytest.raises(SafeDitError, match="cannot keep the masks as shipped"):
        apply_safe_dit(model, SafeConfig("safe-core", rewrite_padding=False))
    apply_safe_dit(model, SafeConfig("dense-fp", rewrite_padding=False))  # the ablation: m_i m_j kept as shipped
    inputs = chroma_inputs(model, 3, 4, batch=2, text_len=12, valid_lens=[11, 3])
    with SdpaSpy() as spy:
        kept = forward(model, inputs)
    remove_safe_dit(model)
    assert all(m is not None and m.dim() == 4 for m in spy.masks) and _close(kept, forward(model, inputs))
    pipe = build_chroma_pipeline()
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 12, 24, generator=g),
              prompt_attention_mask=(torch.arange(12) <= 6)[None].float(),
              negative_prompt_embeds=torch.randn(1, 12, 24, generator=g),
              negative_prompt_attention_mask=(torch.arange(12) <= 2)[None].float(),
              guidance_scale=4.0, height=32, width=48, num_inference_steps=4, output_type="latent")
    apply_safe_dit(pipe, SafeConfig("safe-core", warmup_steps=1, anchor_interval=2))
    with pytest.raises(SafeDitError, match="one transformer call per sampling step"):
        pipe(**kw)
    apply_safe_dit(pipe, SafeConfig("dense-fp"))  # dense-fp runs CFG's two calls
    with SdpaSpy() as spy:
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    remove_safe_dit(pipe)
    assert spy.masks and all(m is None for m in spy.masks)
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert _close(out, ref)


def test_cli_audit_generate_and_bench(tmp_path, capsys):
    assert main(["audit", "--model", "chroma", "--height-tokens", "3", "--width-tokens", "4"]) == 0
    out = tmp_path / "c.png"
    assert main(["generate", "a red circle", "--model", "tiny-random-chroma", "--steps", "4", "--height", "64",
                 "--width", "64", "--guidance", "1", "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "c.sensitivity.png").exists()
    build_chroma_text_pipeline().save_pretrained(tmp_path / "chroma")  # generate --model DIR, offline
    for mode, guidance in (("dense-fp", "4"), ("safe-core", "1")):
        capsys.readouterr()
        assert main(["generate", "a red circle", "--model", str(tmp_path / "chroma"), "--mode", mode, "--height", "64",
                     "--width", "64", "--steps", "3", "--guidance", guidance, "--out", str(tmp_path / "d.png")]) == 0
        assert json.loads((tmp_path / "d.json").read_text())["backbone"] == "chroma"
    capsys.readouterr()  # bench e2e's code path (correctness check, every mode), nothing timed
    assert main(["bench", "e2e", "--model", "chroma", "--preset", "tiny", "--layers", "1", "--steps", "4", "--tokens",
                 "64", "--time-up-to", "0", "--no-memory", "--no-progress", "--guidance", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["status"] for r in result["rows"]} == {"ok"} and result["rows"][1]["rel_err_vs_dense_short_call"] < 1e-5
