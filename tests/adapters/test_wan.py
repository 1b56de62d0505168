"""Wan (WanTransformer3DModel / WanPipeline): no mask anywhere, so dense-fp is the stock computation; safe-core over
the (frames, height, width) token grid with its 3-D RoPE rows; CFG as WanPipeline's two calls per step (safe-core and
safe-sw equal to the same schedule run on a [cond; uncond] batch); Wan 2.2's two transformers; the refusals.
The backbone-wide contract (dense-fp = dense through the loop, keep 1 = dense-fp, sparse, mask-free, prompt-driven)
runs on Wan from tests/adapters/test_backbones.py."""

from __future__ import annotations

import pytest
import torch

import safe_dit
import safe_dit.adapters.wan as wan_adapter
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.adapters import adapter_for
from safe_dit.api import is_safe_dit_applied, runtime_of
from safe_dit.engine.generation import Generation, gather_rows
from safe_dit.testing.wan import KIT, build_wan, build_wan22_pipeline, build_wan_pipeline, wan_inputs

from helpers import _draw, forward, processors, stock_vs_dense_fp

STEPS, GUIDANCE = 10, 4.0
SIZE = dict(height=64, width=96, num_frames=9)  # 3 latent frames x 4 x 6 tokens
N = 72


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _prompts(pipe, seed=1):
    return KIT.prompt_kwargs(pipe.transformer, _draw(seed, None), 8, (6, 2))


def _pipe_run(pipe, guidance=GUIDANCE, seed=1, **kw):
    out = pipe(**_prompts(pipe, seed), **SIZE, num_inference_steps=STEPS, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
    return out.frames


def _batched_run(pipe, guidance=GUIDANCE, config=None):
    """The same sampling loop as WanPipeline, written out, with CFG as one [cond; uncond] batch per step (under
    ``config``'s schedule through safe_dit.generation(..., cfg_batch=True) when scheduled)."""
    kwargs = _prompts(pipe)
    cond, uncond = kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]
    latents = pipe.prepare_latents(1, 16, SIZE["height"], SIZE["width"], SIZE["num_frames"], torch.float32, "cpu",
                                   torch.Generator().manual_seed(0))
    scheduler, model = pipe.scheduler, pipe.transformer
    scheduler.set_timesteps(STEPS)
    scheduler.set_begin_index(0)
    pipe._guidance_scale = guidance  # as WanPipeline.__call__ sets it (safe-sw's batched guide reads it)
    scope = safe_dit.generation(model, num_steps=STEPS, cfg_batch=True) if config is not None and config.scheduled \
        else torch.no_grad()
    with torch.no_grad(), scope:
        for t in scheduler.timesteps:
            out = model(hidden_states=torch.cat([latents, latents]), timestep=t.expand(2),
                        encoder_hidden_states=torch.cat([cond, uncond]), return_dict=False)[0]
            c, u = out.chunk(2)
            latents = scheduler.step(u + guidance * (c - u), t, latents, return_dict=False)[0]
    return latents


# -- dense-fp ------------------------------------------------------------------------------------------

def test_dense_fp_is_the_stock_computation_and_no_mask_reaches_sdpa():
    model = build_wan()
    inputs = wan_inputs(model, 4, 6, batch=2, valid_lens=[8, 3], frames=3)
    dense, fast, stock_masks, masks = stock_vs_dense_fp(model, inputs)  # dense-fp on the flash kernel alone
    assert stock_masks and all(m is None for m in stock_masks)  # the stock model passes none either
    assert masks and all(m is None for m in masks)
    assert _rel(fast, dense) <= 1e-6
    apply_safe_dit(model, SafeConfig("dense-fp"))
    runtime_of(model).trace = []
    forward(model, inputs)
    trace = runtime_of(model).trace
    remove_safe_dit(model)
    assert len(trace) == 2 * 2 and {v for _, v in trace} == {"no mask"}  # both blocks' self- and cross-attention


@pytest.mark.parametrize("dtype,frames,h,w", [(torch.bfloat16, 3, 4, 6), (torch.float32, 1, 3, 5)],
                         ids=["bf16", "one-frame-odd-grid"])
def test_dense_fp_equals_stock_in_bf16_and_on_an_odd_grid(dtype, frames, h, w):
    model = build_wan(dtype=dtype)
    inputs = wan_inputs(model, h, w, batch=2, valid_lens=[8, 2], frames=frames)
    dense, fast, _, masks = stock_vs_dense_fp(model, inputs)
    assert all(m is None for m in masks) and torch.equal(fast, dense)


def test_fused_projections_run_through_the_fast_path_unchanged():
    model = build_wan()
    inputs = wan_inputs(model, 4, 6, frames=2)
    reference = forward(model, inputs)
    model.fuse_qkv_projections()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fused = forward(model, inputs)
    remove_safe_dit(model)
    assert _rel(fused, reference) <= 1e-5


def test_removal_restores_processors_and_hooks_exactly():
    pipe = build_wan22_pipeline()
    models = (pipe.transformer, pipe.transformer_2)
    before = [processors(m) for m in models]
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in models]
    apply_safe_dit(pipe, SafeConfig("safe-core"))
    assert all(is_safe_dit_applied(m) for m in models)
    remove_safe_dit(pipe)
    assert not any(is_safe_dit_applied(m) for m in models)
    for m, procs, (pre, post) in zip(models, before, hooks):
        assert processors(m) == procs and all(processors(m)[k] is procs[k] for k in procs)
        assert dict(m._forward_pre_hooks) == pre and dict(m._forward_hooks) == post


def test_a_processor_swap_on_transformer_2_is_seen_and_repaired_by_apply():
    pipe = build_wan22_pipeline()
    config = SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2)
    apply_safe_dit(pipe, config)
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    pipe.transformer_2.set_attn_processor(WanAttnProcessor())  # the stock processors back on transformer_2
    assert not is_safe_dit_applied(pipe)
    with pytest.raises(SafeDitError, match="apply_safe_dit"):
        _pipe_run(pipe)
    apply_safe_dit(pipe, config)  # the same config re-patches both instead of doing nothing
    assert is_safe_dit_applied(pipe) and is_safe_dit_applied(pipe.transformer_2)
    assert torch.isfinite(_pipe_run(pipe)).all()
    remove_safe_dit(pipe)


# -- safe-core on the space-time grid ----------------------------------------------------------------------

def test_sensitive_rows_carry_their_own_3d_rope_rows(monkeypatch):
    """Fed the same inputs at every step, a selective step's context K/V and outputs are exactly the anchor's, so the
    output equals dense-fp on every token: it does only where each sensitive row is rotated by its own RoPE row."""
    model = build_wan()
    inputs = wan_inputs(model, 4, 6, batch=2, valid_lens=[8, 5], frames=3)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense = forward(model, inputs)
    config = SafeConfig("safe-core", keep_ratio=0.3, warmup_steps=1, anchor_interval=3, tail_dense_steps=0,
                        reuse_every=0)

    def selective_outputs():
        apply_safe_dit(model, config)
        with torch.no_grad(), safe_dit.generation(model, num_steps=3) as g:
            outs = [model(**inputs)[0] for _ in range(3)]
        return g.report(), outs

    report, outs = selective_outputs()
    assert report["steps"] == ["warmup", "selective", "selective"]
    assert report["tokens_per_step"] == [N, 22, 22] and runtime_of(model).last_grid == (3, 4, 6)
    assert all(_rel(o, dense) <= 1e-5 for o in outs)
    # the same run with each sensitive row given its neighbour's RoPE row: the check above would fail
    monkeypatch.setattr(wan_adapter, "gather_rows", lambda t, index: gather_rows(t, index.roll(1, dims=1)))
    _, wrong = selective_outputs()
    remove_safe_dit(model)
    assert _rel(wrong[1], dense) > 1e-3


def test_pcsp_weighs_only_the_prompts_words(monkeypatch):
    """Zero-padded caption rows (WanPipeline's padding) and the closing </s> carry no PCSP weight."""
    seen = []
    original = Generation.collect
    monkeypatch.setattr(Generation, "collect", lambda self, p, w: (seen.append(w.clone()), original(self, p, w)))
    pipe = build_wan_pipeline()
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2))
    _pipe_run(pipe)
    remove_safe_dit(pipe)
    assert len(seen) == 2 * 2  # 2 blocks x 2 warm-up steps, the conditional call only
    assert all(w.tolist() == [[1.0] * 5 + [0.0] * 3] for w in seen)  # 6 valid tokens, the 6th is </s>


# -- CFG as WanPipeline's two calls per step -------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return build_wan_pipeline()


def test_the_hand_written_batched_loop_is_wan_pipelines_loop(pipe):
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    assert _rel(_batched_run(pipe), _pipe_run(pipe)) <= 1e-5
    remove_safe_dit(pipe)


@pytest.mark.parametrize("config", [
    SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2, anchor_interval=3, context_forecast=1, reuse_every=2),
    SafeConfig("safe-sw", keep_ratio=0.25, warmup_steps=2, anchor_interval=3, cfg_context=2.0, cfg_sensitive=7.0),
], ids=["safe-core", "safe-sw"])
def test_two_calls_per_step_equal_the_same_schedule_on_a_cfg_batch(pipe, config):
    """The conditional and unconditional calls keep their own caches and share the prompt's partition: exactly what
    the schedule does to the two halves of a [cond; uncond] batch. SW-CFG through the pipeline's own combination
    equals SW-CFG applied to the batch."""
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    dense_fp = _pipe_run(pipe)
    apply_safe_dit(pipe, config)
    calls = _pipe_run(pipe)
    report = runtime_of(pipe).last_report
    batched = _batched_run(pipe, config=config)
    remove_safe_dit(pipe)
    assert "selective" in report["steps"] and report["sensitive_tokens"] == 18
    assert _rel(calls, batched) <= 1e-5
    assert _rel(calls, dense_fp) > 1e-3  # the schedule changed something that both runs reproduce


def test_safe_sw_at_equal_scales_is_safe_core(pipe):
    base = dict(keep_ratio=0.25, warmup_steps=2, anchor_interval=3)
    apply_safe_dit(pipe, SafeConfig("safe-core", **base))
    core = _pipe_run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-sw", cfg_context=GUIDANCE, cfg_sensitive=GUIDANCE, **base))
    same = _pipe_run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-sw", cfg_context=1.5, cfg_sensitive=8.0, **base))
    weighted = _pipe_run(pipe)
    remove_safe_dit(pipe)
    assert _rel(same, core) <= 1e-5 and _rel(weighted, core) > 1e-3


def test_guidance_off_is_one_call_per_step(pipe):
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, warmup_steps=2, anchor_interval=3))
    out = _pipe_run(pipe, guidance=1.0)
    h.remove()
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    ref = _pipe_run(pipe, guidance=1.0)
    remove_safe_dit(pipe)
    assert len(calls) == STEPS and _rel(out, ref) <= 1e-5


# -- Wan 2.2: two transformers, one trajectory ------------------------------------------------------------------

def _who_runs(pipe):
    ran = []
    handles = [pipe.transformer.register_forward_pre_hook(lambda *_: ran.append(1)),
               pipe.transformer_2.register_forward_pre_hook(lambda *_: ran.append(2))]
    return ran, handles


def test_two_transformers_dense_fp_and_keep_one_equal_dense_across_the_switch():
    pipe = build_wan22_pipeline()
    ran, handles = _who_runs(pipe)
    dense = _pipe_run(pipe)
    assert ran == [1] * 14 + [2] * 6  # 7 steps on transformer (t >= 600), 3 on transformer_2, 2 calls each
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    dense_fp = _pipe_run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, warmup_steps=2, anchor_interval=3))
    keep_one = _pipe_run(pipe)
    report = runtime_of(pipe).last_report
    remove_safe_dit(pipe)
    [h.remove() for h in handles]
    assert _rel(dense_fp, dense) <= 1e-5 and _rel(keep_one, dense_fp) <= 1e-5
    assert report["steps"].count("selective") >= 4


def test_safe_core_runs_the_whole_trajectory_across_the_switch():
    pipe = build_wan22_pipeline()
    first_gens, second_gens, at_switch = [], [], []

    def on_first(_m, _a):
        first_gens.append(runtime_of(pipe.transformer).generation)

    def on_second(_m, _a):  # after the take-over and the step tracker
        second_gens.append(runtime_of(pipe.transformer_2).generation)
        at_switch.append(runtime_of(pipe.transformer).generation)

    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2, anchor_interval=4, anchor_growth=0.0,
                                    tail_dense_steps=1, context_forecast=1, reuse_every=2))
    handles = [pipe.transformer.register_forward_pre_hook(on_first),
               pipe.transformer_2.register_forward_pre_hook(on_second)]
    out = _pipe_run(pipe)
    report, report_2 = runtime_of(pipe).last_report, runtime_of(pipe.transformer_2).last_report
    partition, partition_2 = runtime_of(pipe).last_index, runtime_of(pipe.transformer_2).last_index
    [h.remove() for h in handles]
    remove_safe_dit(pipe)
    # one plan over the 10 steps; step 7 (reuse in the plan) is the incoming transformer's first: dense
    assert report["steps"] == ["warmup"] * 2 + ["selective", "reuse", "selective", "anchor", "selective", "anchor",
                                               "tail", "selective"]
    assert report_2 is report and torch.equal(partition, partition_2)  # both carry the trajectory's report
    assert report["tokens_per_step"] == [N, N, 18, 0, 18, N, 18, N, N, 18]
    assert len({id(g) for g in first_gens}) == 1 and len({id(g) for g in second_gens}) == 1
    assert first_gens[0] is not second_gens[0]  # each transformer its own generation and caches
    assert all(g is None for g in at_switch)  # the outgoing transformer's caches are released at the switch
    assert torch.isfinite(out).all()


def test_safe_sw_guides_transformer_2_through_guidance_scale_2():
    """SW-CFG at a constant gamma = 4 replaces the pipeline's scales on both transformers (guidance_scale 4, and
    guidance_scale_2 2.5 on the low-noise steps): the run equals safe-core with both scales at 4."""
    pipe = build_wan22_pipeline()
    base = dict(keep_ratio=0.25, warmup_steps=2, anchor_interval=3)
    apply_safe_dit(pipe, SafeConfig("safe-core", **base))
    core = _pipe_run(pipe, guidance_scale_2=GUIDANCE)
    apply_safe_dit(pipe, SafeConfig("safe-sw", cfg_context=GUIDANCE, cfg_sensitive=GUIDANCE, **base))
    sw = _pipe_run(pipe, guidance_scale_2=2.5)
    apply_safe_dit(pipe, SafeConfig("safe-core", **base))
    plain = _pipe_run(pipe, guidance_scale_2=2.5)
    remove_safe_dit(pipe)
    assert _rel(sw, core) <= 1e-5 and _rel(plain, core) > 1e-3


def test_a_switch_during_warm_up_keeps_accumulating_the_partition():
    pipe = build_wan22_pipeline(boundary_ratio=0.95)  # transformer runs step 0 only
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=3, anchor_interval=3))
    _pipe_run(pipe)
    report = runtime_of(pipe.transformer_2).last_report
    remove_safe_dit(pipe)
    assert report["steps"][:3] == ["warmup"] * 3 and report["sensitive_tokens"] == 18


# -- video-to-video: a trajectory that starts part-way into the schedule -----------------------------------------

def _v2v_run(pipe, strength=0.6):
    from PIL import Image

    frames = [Image.new("RGB", (SIZE["width"], SIZE["height"]), (40 * i % 255, 90, 200 - 20 * i)) for i in range(9)]
    out = pipe(video=frames, **_prompts(pipe), height=SIZE["height"], width=SIZE["width"], strength=strength,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    return out.frames


def test_video_to_video_plans_the_steps_it_runs():
    """WanVideoToVideoPipeline (strength < 1) starts at the scheduler's begin_index: dense-fp is the stock
    computation, keep 1 equals dense-fp, and safe-core plans exactly the steps that run (6 of 10 at strength 0.6),
    warm-up first and the tail last."""
    from diffusers import WanVideoToVideoPipeline

    base = build_wan_pipeline()
    pipe = WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, vae=base.vae, scheduler=base.scheduler,
                                   transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    dense = _v2v_run(pipe)
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    dense_fp = _v2v_run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, warmup_steps=2, anchor_interval=3))
    keep_one = _v2v_run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2, anchor_interval=3))
    core = _v2v_run(pipe)
    report = runtime_of(pipe).last_report
    remove_safe_dit(pipe)
    assert _rel(dense_fp, dense) <= 1e-5 and _rel(keep_one, dense_fp) <= 1e-5
    assert len(report["steps"]) == 6 and report["steps"][:2] == ["warmup"] * 2 and "selective" in report["steps"]
    assert _rel(core, dense_fp) > 1e-3


# -- what is refused -----------------------------------------------------------------------------------

def test_image_to_video_is_refused_with_what_works():
    i2v = build_wan(image_dim=8, added_kv_proj_dim=8)
    with pytest.raises(SafeDitError, match="text-to-video Wan .* only"):
        apply_safe_dit(i2v, SafeConfig("dense-fp"))
    from diffusers import WanImageToVideoPipeline

    base = build_wan_pipeline()
    i2v_pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=base.vae, scheduler=base.scheduler,
                                       transformer=build_wan(in_channels=36))  # Wan 2.2 I2V: image in the latents
    with pytest.raises(SafeDitError, match="WanImageToVideoPipeline"):
        apply_safe_dit(i2v_pipe, SafeConfig("safe-core"))
    assert not is_safe_dit_applied(i2v_pipe)
    model = build_wan()
    inputs = wan_inputs(model, 4, 6, frames=2)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with pytest.raises(SafeDitError, match="encoder_hidden_states_image"):
        forward(model, dict(inputs, encoder_hidden_states_image=torch.zeros(1, 4, 8)))
    remove_safe_dit(model)


def test_per_token_timesteps_are_refused_when_scheduled():
    model = build_wan()
    inputs = wan_inputs(model, 4, 6, frames=2)
    apply_safe_dit(model, SafeConfig("safe-core", warmup_steps=1))
    with pytest.raises(SafeDitError, match="per-token timesteps"), safe_dit.generation(model, num_steps=2):
        forward(model, dict(inputs, timestep=inputs["timestep"][:, None].expand(-1, 2 * 4 * 6)))
    remove_safe_dit(model)


def test_vace_has_no_adapter_and_the_error_names_wan():
    from diffusers import WanVACETransformer3DModel

    vace = WanVACETransformer3DModel(num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32,
                                     ffn_dim=48, num_layers=2, vace_layers=[0], vace_in_channels=16,
                                     rope_max_seq_len=32)
    with pytest.raises(SafeDitError, match="WanTransformer3DModel"):
        adapter_for(vace)


def test_a_third_call_in_one_step_is_refused(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", warmup_steps=1))
    model = pipe.transformer
    calls = {"n": 0}

    def third(_m, args, kwargs):  # WanPipeline's two calls of step 1, then a third at the same step
        calls["n"] += 1
        if calls["n"] == 4:
            model(**kwargs)

    handle = model.register_forward_pre_hook(third, with_kwargs=True)
    with pytest.raises(SafeDitError, match="again at step 1"):
        _pipe_run(pipe)
    handle.remove()
    remove_safe_dit(pipe)


# -- bench e2e on video ------------------------------------------------------------------------------------

def test_bench_e2e_runs_a_video_grid_through_wan_pipeline(capsys):
    import json

    from safe_dit.cli import main

    assert main(["bench", "e2e", "--model", "wan", "--preset", "tiny", "--layers", "1", "--frames", "4", "--tokens",
                 "256", "--steps", "6", "--repeats", "1", "--no-memory", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    settings = result["settings"]
    assert settings["latent_frames"] == 4 and settings["batch"] == "1, two calls per step (CFG)"
    assert {r["mode"] for r in result["rows"]} == {"dense", "dense-fp", "safe-core", "safe-sw"}
    assert all(r["rel_err_vs_dense_short_call"] <= 1e-5 for r in result["rows"] if r["mode"] == "dense-fp")
    core = next(r for r in result["rows"] if r["mode"] == "safe-core")
    assert core["tokens_per_step"][0] == 4 * 8 * 8 and core["token_fraction"] < 1
    assert main(["bench", "e2e", "--model", "wan", "--preset", "tiny", "--frames", "4", "--tokens", "200",
                 "--no-progress"]) != 0
    assert "use 4 frames of square grids" in capsys.readouterr().err
