"""Lumina-Image-2.0 (Lumina2Transformer2DModel): caption and joint key padding rewritten exactly; safe-core on a
CFG batch of different caption lengths; what is refused."""

from __future__ import annotations

import json

import pytest
import torch

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.cli import main
from safe_dit.inspection.audit import trace_forward
from safe_dit.testing.lumina2 import build_lumina2, build_lumina2_pipeline, lumina2_inputs

from helpers import RUNS, SdpaSpy, forward, selective_flops, stock_vs_dense_fp

run = RUNS["lumina2"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,lens", [(4, 6, [8, 8]), (3, 5, [8, 3]), (5, 3, [6]), (2, 2, [2, 7]), (3, 3, [5, 5])])
def test_dense_fp_equals_dense_with_no_mask_on_the_flash_kernel(h, w, lens, dtype):
    model = build_lumina2(dtype=dtype)
    inputs = lumina2_inputs(model, h, w, batch=len(lens), text_len=8, valid_lens=lens, seed=h * 10 + w)
    dense, fast, stock_masks, masks = stock_vs_dense_fp(model, inputs)
    if len(set(lens)) > 1:  # the stock model masks the caption refiner and every joint block
        assert sum(m is not None for m in stock_masks) == 3
    assert masks and all(m is None for m in masks)
    assert (fast - dense).abs().max().item() <= TOL[dtype] * dense.abs().max().item()


def test_decisions_per_stack():
    model = build_lumina2()
    inputs = lumina2_inputs(model, 3, 4, batch=2, text_len=8, valid_lens=[8, 3])
    apply_safe_dit(model, SafeConfig("dense-fp"))
    calls = {c["module"]: c["verdict"] for c in trace_forward(model, inputs)}
    remove_safe_dit(model)
    assert calls == {"context_refiner.0.attn": "rewritten: split-batch (exact)", "noise_refiner.0.attn": "no mask",
                     "layers.0.attn": "rewritten: split-batch (exact)",
                     "layers.1.attn": "rewritten: split-batch (exact)"}


def _cfg_steps(model, steps_inputs, config):
    apply_safe_dit(model, config)
    with (torch.no_grad(), safe_dit.generation(model, num_steps=len(steps_inputs), cfg_batch=True) as g,
          SdpaSpy() as spy):
        outs = [model(**inputs)[0] for inputs in steps_inputs]
    remove_safe_dit(model)
    return outs, g, spy


@pytest.mark.parametrize("lens", [[8, 3], [8, 8]], ids=["different", "equal"])
def test_safe_core_on_a_cfg_batch(lens):
    model = build_lumina2()
    base = lumina2_inputs(model, 4, 6, batch=2, text_len=8, valid_lens=lens)
    steps = [dict(base,
                  hidden_states=(base["hidden_states"] * (1 - 0.1 * i)
                                 + 0.1 * i * torch.randn_like(base["hidden_states"])),
                  timestep=base["timestep"] * 0 + i / 6) for i in range(6)]  # the latents move, the captions stay
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense_fp = [forward(model, inputs) for inputs in steps]
    remove_safe_dit(model)
    sched = dict(warmup_steps=1, anchor_interval=3, tail_dense_steps=0, anchor_growth=0.0)
    full, g1, _ = _cfg_steps(model, steps, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, **sched))
    assert "selective" in g1.report()["steps"]
    assert all((o - d).abs().max() <= 1e-5 * d.abs().max() for o, d in zip(full, dense_fp))  # keep 1 == dense-fp
    sparse, g2, spy = _cfg_steps(model, steps, SafeConfig("safe-core", keep_ratio=0.25, reuse_every=0, **sched))
    report = g2.report()
    assert report["steps"] == ["warmup", "selective", "selective", "anchor", "selective", "selective"]
    assert report["tokens_per_step"][1] == 6 and report["tokens_per_step"][0] == 24
    assert spy.masks and all(m is None for m in spy.masks)  # mask-free at every step kind, lengths equal or not
    assert all(torch.isfinite(o).all() for o in sparse)
    assert not torch.allclose(sparse[1], dense_fp[1], atol=1e-4)  # context rows really reuse the anchor
    assert torch.equal(sparse[0], full[0])  # warm-up and anchors are dense steps: dense-fp's output
    assert (sparse[3] - dense_fp[3]).abs().max() <= 1e-5 * dense_fp[3].abs().max()


def test_the_prompt_decides_the_partition():
    model = build_lumina2()
    a = lumina2_inputs(model, 4, 6, batch=1, seed=1)
    b = dict(a, encoder_hidden_states=torch.randn_like(a["encoder_hidden_states"]))
    index = []
    for inputs in (a, b):
        apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=1, anchor_interval=3))
        with torch.no_grad(), safe_dit.generation(model, num_steps=3):
            for _ in range(3):
                model(**inputs)
        index.append(safe_dit.api.runtime_of(model).last_index.clone())
        remove_safe_dit(model)
    assert not torch.equal(index[0], index[1])


def test_selective_steps_do_a_fraction_of_the_work():
    model = build_lumina2()
    flops = selective_flops(model, lumina2_inputs(model, 8, 8, batch=2, valid_lens=[8, 3]))
    assert flops[0.25] < 0.5 * flops[1.0]


def test_refusals():
    model = build_lumina2()
    with pytest.raises(SafeDitError, match="safe-sw is not available for Lumina-Image-2.0"):
        apply_safe_dit(model, SafeConfig("safe-sw"))
    pipe = build_lumina2_pipeline()
    apply_safe_dit(pipe, SafeConfig("safe-core", warmup_steps=1, anchor_interval=2))
    with pytest.raises(SafeDitError, match="twice per step"):
        run(pipe, steps=4, guidance_scale=4.0)  # cond and uncond as two calls
    with pytest.raises(SafeDitError, match="cfg_trunc_ratio"):
        with torch.no_grad(), safe_dit.generation(pipe.transformer, num_steps=3, cfg_batch=True):
            two = lumina2_inputs(pipe.transformer, 4, 6, batch=2, valid_lens=[8, 3])
            pipe.transformer(**two)
            pipe.transformer(**lumina2_inputs(pipe.transformer, 4, 6, batch=1))
    with pytest.raises(SafeDitError, match="caption lengths changed"):
        with torch.no_grad(), safe_dit.generation(pipe.transformer, num_steps=3, cfg_batch=True):
            pipe.transformer(**lumina2_inputs(pipe.transformer, 4, 6, batch=2, valid_lens=[8, 3]))
            pipe.transformer(**lumina2_inputs(pipe.transformer, 4, 6, batch=2, valid_lens=[8, 5]))
    apply_safe_dit(pipe, SafeConfig("dense-fp"))  # dense-fp runs with guidance
    out = run(pipe, steps=2, guidance_scale=4.0)
    remove_safe_dit(pipe)
    assert torch.allclose(out, run(pipe, steps=2, guidance_scale=4.0), atol=1e-5)

    class Custom(type(model)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    custom = build_lumina2()
    custom.__class__ = Custom
    with pytest.raises(SafeDitError, match="stock Lumina2Transformer2DModel.forward"):
        apply_safe_dit(custom, SafeConfig("safe-core"))
    apply_safe_dit(custom, SafeConfig("dense-fp"))  # dense-fp does not depend on the forward's layout
    remove_safe_dit(custom)


def test_cli_audit_and_generate(tmp_path, capsys):
    assert main(["audit", "--model", "lumina2", "--height-tokens", "3", "--width-tokens", "4"]) == 0
    out = tmp_path / "l2.png"
    assert main(["generate", "a red circle", "--model", "tiny-random-lumina2", "--steps", "4", "--height", "64",
                 "--width", "64", "--guidance", "1", "--out", str(out)]) == 0
    assert out.exists()
    from safe_dit.testing.lumina2 import build_lumina2_text_pipeline

    build_lumina2_text_pipeline().save_pretrained(tmp_path / "lumina2")  # generate --model DIR, offline
    for mode, guidance in (("dense-fp", "4"), ("safe-core", "1")):
        capsys.readouterr()
        assert main(["generate", "a red circle", "--model", str(tmp_path / "lumina2"), "--mode", mode, "--height",
                     "64",
                     "--width", "64", "--steps", "3", "--guidance", guidance, "--out", str(tmp_path / "d.png")]) == 0
        assert json.loads((tmp_path / "d.json").read_text())["backbone"] == "lumina2"
