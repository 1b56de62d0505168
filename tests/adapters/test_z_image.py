"""Z-Image (ZImageTransformer2DModel): its batch-padding masks rewritten into mask-free calls; safe-core on the unified
[image; caption] sequence (sensitive rows, the image pad rows and every caption row fresh) on batches of equal and
different caption lengths and on odd grids; what is refused. The whole-loop contract is in test_backbones."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.cli import main
from safe_dit.inspection.recipes import recipe_for
from safe_dit.testing.z_image import build_z_image, build_z_image_pipeline, build_z_image_text_pipeline, z_image_inputs

from helpers import RUNS, SdpaSpy, forward, processors, selective_flops

RECIPE = recipe_for("ZImageTransformer2DModel")
run = RUNS["z-image"]


def _close(a, b, tol=1e-5):
    return all((x - y).abs().max() <= tol * y.abs().max() for x, y in zip(a, b))


@pytest.mark.parametrize("lens", [[40, 10], [40, 40], [20], [5, 33, 70]], ids=["different", "equal", "one", "three"])
def test_dense_fp_equals_dense_with_no_mask(lens):
    model = RECIPE.build(0)
    inputs = RECIPE.inputs(model, len(lens), lens, (4, 6), torch.Generator().manual_seed(1))
    with SdpaSpy() as stock:
        dense = forward(model, inputs)
    before = processors(model)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy:
        fast = forward(model, inputs)
    remove_safe_dit(model)
    padded = {-(-n // 32) for n in lens}  # captions pad to multiples of 32: the batch differs if these do
    assert any(m is not None for m in stock.masks) == (len(padded) > 1)
    assert spy.masks and all(m is None for m in spy.masks)
    assert _close(fast, dense)  # one output per sample (a list, as ZImagePipeline gets it)
    assert all(processors(model)[k] is before[k] for k in before) and not model._forward_pre_hooks


def test_dense_fp_on_the_flash_kernel_in_bf16():
    model = build_z_image(dtype=torch.bfloat16)
    inputs = z_image_inputs(model, 3, 5, batch=2, valid_lens=[40, 7], seed=2)
    dense = forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if a call needed another kernel
        fast = forward(model, inputs)
    remove_safe_dit(model)
    assert _close([f.float() for f in fast], [d.float() for d in dense], 3e-2)


def _steps(model, steps_inputs, config, cfg_batch=False):
    apply_safe_dit(model, config)
    with torch.no_grad(), safe_dit.generation(model, num_steps=len(steps_inputs), cfg_batch=cfg_batch) as g, \
            SdpaSpy() as spy:
        outs = [model(**inputs)[0] for inputs in steps_inputs]
    remove_safe_dit(model)
    return outs, g, spy


def _trajectory(model, grid, lens, n=6):
    base = z_image_inputs(model, *grid, batch=len(lens), valid_lens=lens, seed=4)
    return [dict(base, x=[x * (1 - 0.1 * i) + 0.1 * i * torch.randn_like(x) for x in base["x"]],
                 t=base["t"] * 0 + i / n) for i in range(n)]


@pytest.mark.parametrize("grid,lens", [((4, 6), [40, 3]), ((4, 6), [8, 8]), ((4, 8), [70, 5]), ((3, 5), [9])],
                         ids=["different-pad-rows", "equal", "no-pad-rows", "batch1-odd"])
def test_safe_core_on_the_unified_sequence(grid, lens):
    """keep_ratio 1 reproduces dense-fp through selective steps (so the image pad rows and every caption row are
    laid out and rotated right); keep 0.25 computes a quarter of the image rows, mask-free, anchors exact."""
    model = build_z_image()
    steps = _trajectory(model, grid, lens)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense_fp = [forward(model, inputs) for inputs in steps]
    remove_safe_dit(model)
    sched = dict(warmup_steps=1, anchor_interval=3, tail_dense_steps=0, anchor_growth=0.0)
    full, g1, _ = _steps(model, steps, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, **sched),
                         cfg_batch=len(lens) == 2)
    assert "selective" in g1.report()["steps"]
    assert all(_close(o, d) for o, d in zip(full, dense_fp))  # keep 1 == dense-fp
    sparse, g2, spy = _steps(model, steps, SafeConfig("safe-core", keep_ratio=0.25, reuse_every=0, **sched))
    report, n = g2.report(), grid[0] * grid[1]
    assert report["steps"] == ["warmup", "selective", "selective", "anchor", "selective", "selective"]
    assert report["tokens_per_step"][0] == n and report["tokens_per_step"][1] == -(-n // 4)
    assert spy.masks and all(m is None for m in spy.masks)
    assert all(torch.isfinite(o).all() for out in sparse for o in out)
    assert not _close(sparse[1], dense_fp[1], 1e-4)  # context rows reuse the anchor
    assert _close(sparse[3], dense_fp[3])  # the anchor is a dense step


def test_keep_ratio_one_is_dense_fp_in_bf16():
    model = build_z_image(dtype=torch.bfloat16)
    steps = _trajectory(model, (4, 6), [40, 3])
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense_fp = [forward(model, inputs) for inputs in steps]
    remove_safe_dit(model)
    full, g, _ = _steps(model, steps, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, warmup_steps=1,
                                                 anchor_interval=3, tail_dense_steps=0, anchor_growth=0.0),
                                                 cfg_batch=True)
    assert "selective" in g.report()["steps"] and full[1][0].dtype == torch.bfloat16
    assert all(_close([a.float() for a in o], [b.float() for b in d], 1e-2) for o, d in zip(full, dense_fp))


def test_pcsp_reads_each_samples_own_caption():
    """The partition of a sample comes from its own caption: another caption for sample 1 leaves sample 0's alone."""
    model = build_z_image()
    a = z_image_inputs(model, 4, 6, batch=2, valid_lens=[40, 12], seed=3)  # a chat-templated caption has >= 8
    b = dict(a, cap_feats=[a["cap_feats"][0], torch.randn(12, model.config.cap_feat_dim)])
    index = []
    for inputs in (a, b):
        _, g, _ = _steps(model, [inputs] * 3,
                         SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=1, anchor_interval=3))
        index.append(g._gen.index.clone())
    assert torch.equal(index[0][0], index[1][0]) and not torch.equal(index[0][1], index[1][1])


def test_pcsp_weighs_only_the_prompts_words_not_the_chat_template():
    """ZImagePipeline's captions are Qwen3 chat turns: 3 template tokens before the prompt, 5 after, then Z-Image's own
    padding to a multiple of 32; only the prompt's words weigh in PCSP."""
    model = build_z_image()
    apply_safe_dit(model, SafeConfig("safe-core"))
    runtime = safe_dit.api.runtime_of(model)
    valid = torch.arange(32)[None] < torch.tensor([[12], [32]])  # real caption lengths 12 and 32
    weights = runtime.text_weights(valid, 32, "cpu")
    remove_safe_dit(model)
    assert weights[0].tolist() == [0.0] * 3 + [1.0] * 4 + [0.0] * 5 + [0.0] * 20
    assert weights[1].tolist() == [0.0] * 3 + [1.0] * 24 + [0.0] * 5


def test_selective_steps_do_a_fraction_of_the_work():
    """Caption rows are always computed (and the caption refiner in full), so the saving grows with the image: at
    256 image tokens and captions padded to 32 and 64 a quarter of the rows is under half the work."""
    model = build_z_image()
    flops = selective_flops(model, z_image_inputs(model, 16, 16, batch=2, valid_lens=[8, 40]))
    assert flops[0.25] < 0.5 * flops[1.0]


def test_safe_sw_is_u_plus_gamma_through_the_pipelines_own_guidance():
    """ZImagePipeline guides c + g (c - u): with gamma 1 + g on every token SW-CFG is safe-core exactly; with another
    gamma on the context tokens the latents differ."""
    pipe = build_z_image_pipeline()
    sched = dict(keep_ratio=0.25, warmup_steps=2, anchor_interval=3, reuse_every=0)
    outs = {}
    for name, config in {"core": SafeConfig("safe-core", **sched),
                         "sw-flat": SafeConfig("safe-sw", cfg_context=5.0, cfg_sensitive=5.0, **sched),
                         "sw": SafeConfig("safe-sw", cfg_context=2.0, cfg_sensitive=5.0, **sched)}.items():
        apply_safe_dit(pipe, config)
        outs[name] = run(pipe, steps=6)  # guidance 4 = gamma 5
    remove_safe_dit(pipe)
    assert (outs["sw-flat"] - outs["core"]).abs().max() <= 1e-5 * outs["core"].abs().max()
    assert not torch.allclose(outs["sw"], outs["core"], atol=1e-3)
    apply_safe_dit(pipe, SafeConfig("safe-sw", **sched))
    with pytest.raises(SafeDitError, match="cfg_normalization"):
        run(pipe, steps=4, cfg_normalization=1.5)
    remove_safe_dit(pipe)


def test_refusals():
    model = build_z_image()
    apply_safe_dit(model, SafeConfig("safe-core", warmup_steps=1))
    inputs = z_image_inputs(model, 2, 2, batch=2, valid_lens=[4, 40])
    with (pytest.raises(SafeDitError, match="text-to-image only"), torch.no_grad(),
          safe_dit.generation(model, num_steps=2)):
        model(**dict(inputs, x=[[x] for x in inputs["x"]], cap_feats=[[c] for c in inputs["cap_feats"]]))
    with pytest.raises(SafeDitError, match="caption lengths changed"), torch.no_grad(), \
            safe_dit.generation(model, num_steps=2):
        model(**inputs)
        model(**dict(inputs, cap_feats=inputs["cap_feats"][::-1]))
    remove_safe_dit(model)
    pipe = build_z_image_pipeline()
    apply_safe_dit(pipe, SafeConfig("safe-core", warmup_steps=1, anchor_interval=2))
    with pytest.raises(SafeDitError, match="cfg_truncation"):  # drops the unconditional half for the last steps
        run(pipe, steps=4, cfg_truncation=0.05)
    remove_safe_dit(pipe)


def test_cli_audit_generate_and_bench(tmp_path, capsys):
    assert main(["audit", "--model", "z-image", "--height-tokens", "3", "--width-tokens", "4"]) == 0
    out = tmp_path / "z.png"
    assert main(["generate", "a red circle", "--model", "tiny-random-z-image", "--steps", "4", "--height", "32",
                 "--width", "48", "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "z.sensitivity.png").exists()
    build_z_image_text_pipeline().save_pretrained(tmp_path / "zimage")  # generate --model DIR, offline
    for mode in ("dense-fp", "safe-core"):
        capsys.readouterr()
        assert main(["generate", "a red circle", "--model", str(tmp_path / "zimage"), "--mode", mode, "--height", "32",
                     "--width", "32", "--steps", "3", "--out", str(tmp_path / "d.png")]) == 0
        assert json.loads((tmp_path / "d.json").read_text())["backbone"] == "z-image"
    capsys.readouterr()  # bench e2e's code path (correctness check, every mode), nothing timed
    assert main(["bench", "e2e", "--model", "z-image", "--preset", "tiny", "--layers", "2", "--steps", "4", "--tokens",
                 "64", "--time-up-to", "0", "--no-memory", "--no-progress", "--prompts", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["status"] for r in result["rows"]} == {"ok"} and result["rows"][1]["rel_err_vs_dense_short_call"] < 1e-5
