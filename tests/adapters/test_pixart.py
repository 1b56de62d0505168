"""PixArt (PixArtTransformer2DModel): dense-fp exact and mask-free; safe-core/safe-sw through PixArtSigmaPipeline."""

from __future__ import annotations

import pytest
import torch

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.cli import main
from safe_dit.engine.masks import DISCARD_BIAS, KeyPaddingPlan, key_padding_from_bias
from safe_dit.inspection.audit import audit, trace_forward
from safe_dit.testing.kits import build_pixart, build_pixart_pipeline, pixart_inputs

from helpers import SdpaSpy, forward, processors
from helpers import run_pixart as _run

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # max abs error relative to max |output|, as for Lumina

CASES = [  # (height tokens, width tokens, batch, valid caption lengths)
    (5, 7, 1, [8]),  # odd grid
    (3, 8, 2, [8, 3]),  # non-square, CFG batch with different caption lengths (split-batch)
    (4, 4, 2, [5, 5]),  # same padded length in both halves (slice)
    (1, 1, 1, [2]),  # a single image token
    (6, 5, 2, [8, 8]),  # no padding at all
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,b,valid", CASES)
def test_dense_fp_equals_dense(h, w, b, valid, dtype):
    model = build_pixart(dtype=dtype)
    inputs = pixart_inputs(model, h, w, batch=b, valid_lens=valid, seed=h * 10 + w)
    dense = forward(model, inputs).float()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy:
        fast = forward(model, inputs).float()
    remove_safe_dit(model)
    assert spy.masks and all(m is None for m in spy.masks)  # no mask reaches SDPA
    assert torch.isfinite(fast).all() and fast.shape == dense.shape == (b, 8, h * 2, w * 2)
    assert (fast - dense).abs().max().item() <= TOL[dtype] * dense.abs().max().item()


def test_dense_fp_matches_float64_reference():
    model = build_pixart()
    inputs = pixart_inputs(model, 3, 8, batch=2, valid_lens=[8, 3])
    ref64 = forward(model.double(), {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                      for k, v in inputs.items()})
    model.float()
    dense = forward(model, inputs).double()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fast = forward(model, inputs).double()
    err_dense, err_fast = (dense - ref64).abs().max().item(), (fast - ref64).abs().max().item()
    assert err_fast <= 1e-5 * ref64.abs().max().item()
    assert err_fast <= 4 * err_dense + 1e-6


def test_padding_changes_the_output():
    """Guard against a vacuous equality: the caption padding bias really matters in this model."""
    model = build_pixart()
    padded = pixart_inputs(model, 4, 4, batch=1, valid_lens=[3])
    unpadded = dict(padded, encoder_attention_mask=torch.ones_like(padded["encoder_attention_mask"]))
    assert (forward(model, padded) - forward(model, unpadded)).abs().max() > 1e-3


def test_audit_self_attention_has_no_mask_and_cross_attention_is_rewritten():
    model = build_pixart(num_layers=3)
    inputs = pixart_inputs(model, 5, 6, batch=2, valid_lens=[8, 4])
    report = audit(model, inputs)
    stock, safe = report["stock"], report["safe"]
    assert all(c["mask"]["kind"] == "none" for c in stock if c["module"].endswith("attn1"))  # nothing to elide
    assert all(c["mask"]["kind"] == "additive float32" for c in stock if c["module"].endswith("attn2"))
    assert report["summary"]["safe_masked_calls"] == 0 and len(safe) == 3 * 3  # cross split in 2 by length
    assert all(c["verdict"] == "no mask" for c in safe if c["module"].endswith("attn1"))
    assert all(c["verdict"] == "rewritten: split-batch (exact)" for c in safe if c["module"].endswith("attn2"))
    assert not hasattr(model, "_safe_dit_handle")


def test_caption_mask_is_read_once_perforward(monkeypatch):
    reads = []
    original = KeyPaddingPlan.from_key_mask
    monkeypatch.setattr(KeyPaddingPlan, "from_key_mask",
                        staticmethod(lambda m: reads.append(tuple(m.shape)) or original(m)))
    model = build_pixart(num_layers=4)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    forward(model, pixart_inputs(model, 4, 4, batch=2, valid_lens=[8, 5]))
    assert reads == [(2, 8)]


def test_rewrite_padding_off_keeps_the_stock_bias():
    model = build_pixart()
    inputs = pixart_inputs(model, 4, 3, batch=2, valid_lens=[8, 2])
    dense = forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp", rewrite_padding=False))
    cross = [c for c in trace_forward(model, inputs) if c["module"].endswith("attn2")]
    assert cross and all(c["mask"]["kind"] == "additive float32" and c["verdict"] == "kept: padding" for c in cross)
    assert torch.equal(forward(model, inputs), dense)  # the very computation of the stock processor


def test_key_padding_from_bias():
    bias = torch.tensor([[[0.0, 0.0, -10000.0]], [[0.0, -9984.0, float("-inf")]]])  # [2, 1, 3]
    assert key_padding_from_bias(bias, 2).tolist() == [[True, True, False], [True, False, False]]
    assert key_padding_from_bias(torch.tensor([[[0.0, -0.5, DISCARD_BIAS]]]), 1) is None  # a soft bias is semantic
    assert key_padding_from_bias(torch.zeros(4, 1, 3), 2) is None  # per-head masks are not per-sample padding
    with pytest.raises(SafeDitError, match="NaN"):
        key_padding_from_bias(torch.tensor([[float("nan"), 0.0]]), 1)


def test_soft_bias_is_kept_and_exact():
    model = build_pixart()
    inputs = pixart_inputs(model, 3, 3, batch=2)
    inputs["encoder_attention_mask"] = -torch.rand(2, 1, 8)  # a user bias, not padding
    dense = forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    cross = [c for c in trace_forward(model, inputs) if c["module"].endswith("attn2")]
    assert all(c["verdict"].startswith("kept: semantic") for c in cross)
    assert torch.equal(forward(model, inputs), dense)


def test_apply_remove_round_trip_and_idempotence():
    model = build_pixart()
    inputs = pixart_inputs(model, 4, 4, batch=2, valid_lens=[8, 3])
    before, out_before = processors(model), forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    patched = processors(model)
    assert all(type(p).__name__ == "SafePixArtAttnProcessor" for p in patched.values())
    apply_safe_dit(model, SafeConfig("dense-fp"))
    assert all(processors(model)[n] is patched[n] for n in patched)
    for cfg in (SafeConfig("dense-fp", rewrite_padding=False), SafeConfig("safe-core")):  # another config replaces
        apply_safe_dit(model, cfg)
    remove_safe_dit(model)
    assert all(processors(model)[n] is before[n] for n in before)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.pos_embed._forward_hooks and not model.proj_out._forward_hooks
    assert not hasattr(model, "_safe_dit_handle")
    assert torch.equal(forward(model, inputs), out_before)


def test_audit_cli_has_a_pixart_model(tmp_path, capsys):
    path = tmp_path / "audit.json"
    assert main(["audit", "--model", "pixart", "--height-tokens", "3", "--width-tokens", "5", "--json",
                 str(path)]) == 0
    out = capsys.readouterr().out
    assert "PixArtTransformer2DModel" in out and "masked SDPA calls: stock 2/4  ->  safe-dit 0/6" in out
    assert path.exists()


# -- safe-core / safe-sw through PixArtSigmaPipeline ---------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return build_pixart_pipeline()


def test_equal_guidance_scales_reproduce_plain_cfg(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.5))
    core = _run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-sw", keep_ratio=0.5, cfg_context=4.0, cfg_sensitive=4.0))
    sw_equal = _run(pipe)  # safe-sw guides where the scheduler receives the prediction, during the run only:
    assert "step" not in vars(pipe.scheduler)  # the scheduler's own method again after the last step
    apply_safe_dit(pipe, SafeConfig("safe-sw", keep_ratio=0.5, cfg_context=2.0, cfg_sensitive=7.0))
    sw = _run(pipe)
    remove_safe_dit(pipe)
    assert "step" not in vars(pipe.scheduler)  # the scheduler's own method again
    assert (sw_equal - core).abs().max() <= 1e-5 * core.abs().max()
    assert (sw - core).abs().max() > 1e-3


def test_sw_cfg_replaces_the_pipeline_guidance_per_token():
    """What the scheduler receives is u + gamma_i (c - u) on the latent channels (learned sigma split off)."""
    from safe_dit.engine.generation import Generation
    from safe_dit.engine.guidance import SchedulerGuidance, guide, token_guidance

    class Scheduler:
        def step(self, model_output, timestep, sample, generator=None, return_dict=True):
            self.got = model_output
            return (model_output,)

    cfg = SafeConfig("safe-sw", cfg_context=1.5, cfg_sensitive=6.0)
    gen = Generation(cfg, 4)
    gen.grid, gen.cfg_batch, gen.cond_first = (2, 3), True, False  # PixArt's [uncond; cond]
    gen.sensitivity = torch.rand(2, 6)
    sched = Scheduler()
    sw = SchedulerGuidance(type("Pipe", (), {"scheduler": sched})())
    assert "generator" in __import__("inspect").signature(sched.step).parameters  # the pipeline still passes it
    sample = torch.randn(2, 8, 4, 6)  # [uncond; cond], 4 latent + 4 sigma channels, p = 2
    sw(type("RT", (), {"config": cfg}), gen, (sample,))
    uncond, cond = sample[:1, :4], sample[1:, :4]
    sched.step(uncond + 4.0 * (cond - uncond), 0, None)
    gamma = (token_guidance(gen.sensitivity[1:], 1.5, 6.0).view(1, 1, 2, 3)
             .repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.allclose(sched.got, guide(uncond, cond, gamma), atol=1e-6)
    sw.remove()
    assert "step" not in vars(sched)


def test_no_mask_reaches_sdpa_in_any_step(pipe):
    for mode in ("safe-core", "safe-sw"):
        apply_safe_dit(pipe, SafeConfig(mode, keep_ratio=0.25))
        with SdpaSpy() as spy:
            _run(pipe, steps=8)
        remove_safe_dit(pipe)
        assert spy.masks and all(m is None for m in spy.masks), mode


def test_partition_from_the_cond_half_is_deterministic_and_state_is_released(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25))
    rt = runtime_of(pipe)
    _run(pipe, steps=6)
    assert rt.generation is None  # partition and caches released after the last step
    first_index, first_map = rt.last_index.clone(), rt.last_sensitivity.clone()
    _run(pipe, steps=6)
    assert torch.equal(rt.last_index, first_index) and torch.equal(rt.last_sensitivity, first_map)
    assert torch.equal(rt.last_index[0], rt.last_index[1])  # uncond and cond halves share the partition
    assert first_map.min() == 0 and first_map.max() == 1
    _run(pipe, steps=6, negative_seed=3)  # another negative prompt: PCSP reads the cond half, [uncond; cond]
    assert torch.equal(rt.last_index, first_index)
    _run(pipe, steps=6, height=32, width=16)  # another resolution in the next call works
    assert rt.last_sensitivity.shape[1] == 8 * 4
    remove_safe_dit(pipe)


def test_selective_rows_equal_dense_rows_right_after_an_anchor():
    model = build_pixart(num_layers=3)
    inputs = pixart_inputs(model, 5, 6, batch=2, valid_lens=[8, 4])
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense = forward(model, inputs)
    apply_safe_dit(model,
                   SafeConfig("safe-core", keep_ratio=0.3, warmup_steps=1, anchor_interval=2, tail_dense_steps=0))
    with torch.no_grad(), safe_dit.generation(model, num_steps=4) as g:
        outs = [model(**inputs)[0] for _ in range(4)]
    assert g.report()["steps"] == ["warmup", "selective", "anchor", "selective"]
    assert g.report()["tokens_per_step"] == [30, 9, 30, 9]
    for out in outs:
        assert torch.allclose(out, dense, atol=1e-5)


def test_work_per_selective_step_scales_with_keep_ratio():
    from torch.utils.flop_counter import FlopCounterMode

    model = build_pixart(num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128)
    inputs = pixart_inputs(model, 16, 16, batch=2)
    flops = {}
    for keep in (1.0, 0.25):
        apply_safe_dit(model,
                       SafeConfig("safe-core", keep_ratio=keep, warmup_steps=1, anchor_interval=2, tail_dense_steps=0))
        with torch.no_grad(), safe_dit.generation(model, num_steps=3):
            model(**inputs)  # warm-up (fills the caches)
            with FlopCounterMode(display=False) as counter:
                model(**inputs)  # selective
        flops[keep] = counter.get_total_flops()
    remove_safe_dit(model)
    assert 0.25 * 0.9 <= flops[0.25] / flops[1.0] <= 0.25 * 1.15, flops


def test_pcsp_ignores_padding_and_the_t5_end_token():
    from safe_dit.engine.runtime import Runtime

    rt = Runtime(SafeConfig("safe-core"), special_trailing_tokens=1, cond_first=False)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert rt.text_weights(mask, 4, "cpu").tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]


def test_pixart_alpha_pipeline_too():
    from diffusers import PixArtAlphaPipeline

    base = build_pixart_pipeline()
    alpha = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=base.vae, transformer=base.transformer,
                                scheduler=base.scheduler)
    alpha.set_progress_bar_config(disable=True)
    dense = _run(alpha, steps=8)
    apply_safe_dit(alpha, SafeConfig("dense-fp"))
    fast = _run(alpha, steps=8)
    apply_safe_dit(alpha, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, anchor_interval=3))
    full = _run(alpha, steps=8)
    assert "selective" in runtime_of(alpha).last_report["steps"]
    remove_safe_dit(alpha)
    assert (fast - dense).abs().max() <= 1e-5 * dense.abs().max()
    assert (full - fast).abs().max() <= 1e-5 * fast.abs().max()


def test_bench_e2e_quick_runs_every_mode_through_the_pixart_pipeline(capsys):
    import json

    from safe_dit.cli import main

    assert main(["bench", "e2e", "--model", "pixart", "--quick", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["mode"] for r in result["rows"]} == {"dense", "dense-fp", "safe-core", "safe-sw"}
    assert result["settings"]["model_class"] == "PixArtTransformer2DModel" and result["settings"]["text_len"] == 300
    assert all(r["status"] == "ok" for r in result["rows"])
    assert all(r["rel_err_vs_dense_short_call"] <= 1e-5 for r in result["rows"] if r["mode"] == "dense-fp")
    sparse = [r for r in result["rows"] if r["mode"] == "safe-core" and r["timed"]]
    assert sparse and all(r["token_fraction"] < 1 for r in sparse)
