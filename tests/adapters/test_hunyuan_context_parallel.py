"""HunyuanVideo 1.5 and HunyuanVideo under context parallelism: 2 gloo processes on 127.0.0.1 against one process
(dense-fp forwards and safe-core generations on a batch of two captions of different lengths; safe-core through each
pipeline's two CFG calls per step), the path that ran, and the refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit

TOL = 1e-5
NAMES = ("hunyuan-video-1.5", "hunyuan-video")
TEXT, VALID = 40, [38, 3]  # captions of different lengths in one batch
SPLIT = "(captions replicated, image keys sequence-parallel)"


def _cp(spec: str):
    from diffusers import ContextParallelConfig

    kind, degree = spec.split(":")
    ring = kind.startswith("ring")
    return ContextParallelConfig(ring_degree=int(degree) if ring else 1, ulysses_degree=1 if ring else int(degree))


def _delta(a, b) -> float:
    return float((a - b).abs().max())


def _forward(model, x):
    with torch.no_grad():
        return model(**x)[0]


def _pipeline_call(name: str, pipe) -> dict:
    """An 8-step text-to-video call at the kit's tiny size with a conditional and an unconditional call per step
    (prompt 6 of 8 caption tokens valid, negative prompt 2): HunyuanVideo 1.5's guider at scale 6, HunyuanVideo's
    true CFG at 4."""
    from safe_dit.testing.kits import kit_for

    kit = kit_for(name)
    g = torch.Generator().manual_seed(3)
    kw = kit.prompt_kwargs(pipe.transformer, lambda _role, *shape: torch.randn(*shape, generator=g), 8,
                                     (6, 2))
    if name == "hunyuan-video":
        kw["true_cfg_scale"] = 4.0
    else:
        pipe.guider.guidance_scale = 6.0
    run = kit.tiny_run
    return dict(kw, height=run.height, width=run.width, num_frames=run.frames, num_inference_steps=8,
                output_type="latent")


def cases(rank: int, world: int) -> dict:
    from safe_dit.testing.kits import kit_for

    if world != 2:
        raise RuntimeError("the cases are written for 2 ranks")
    out: dict = {}
    knobs = dict(keep_ratio=0.3, warmup_steps=1, anchor_interval=2, tail_dense_steps=0)
    for name in NAMES:
        kit = kit_for(name)
        model = kit.build()
        x = kit.inputs(model, 4, 4, batch=2, text_len=TEXT, valid_lens=VALID)  # 2 latent frames x 4 x 4 = 32 tokens
        apply_safe_dit(model, SafeConfig("dense-fp"))
        one = _forward(model, x)
        rows = []  # the first block's attention: its video query rows
        spy = model.transformer_blocks[0].attn.register_forward_pre_hook(
            lambda _m, args, kwargs: rows.append((kwargs.get("hidden_states", args[0] if args else None)).shape[1]),
            with_kwargs=True)
        for spec in ("ulysses:2", "ring:2"):
            apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp(spec)))
            runtime = model._safe_dit_handle.runtime
            runtime.trace = []  # each attention call's mask verdict: the path that ran
            out[f"dense-fp/{name}/{spec}"] = _delta(_forward(model, x), one)
            out[f"verdicts/{name}/{spec}"] = sorted({v for _, v in runtime.trace})
        spy.remove()
        out[f"rows/{name}"] = rows

        outs = {}
        for spec in (None, "ulysses:2", "ring:2"):
            apply_safe_dit(model, SafeConfig("safe-core", **knobs, context_parallel=spec and _cp(spec)))
            with safe_dit.generation(model, num_steps=4):
                outs[spec] = torch.stack([_forward(model, x) for _ in range(4)])
            out[f"kinds/{name}/{spec}"] = sorted(set(model._safe_dit_handle.runtime.last_report["steps"]))
        remove_safe_dit(model)
        for spec in ("ulysses:2", "ring:2"):
            out[f"safe-core/{name}/{spec}"] = _delta(outs[spec], outs[None])

        pipe = kit.pipeline()
        kw = _pipeline_call(name, pipe)
        results = {}
        for spec in (None, "ulysses:2"):
            apply_safe_dit(pipe, SafeConfig("safe-core", context_parallel=spec and _cp(spec)))
            results[spec] = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
            report = pipe.transformer._safe_dit_handle.runtime.last_report
            out[f"pipe-kinds/{name}/{spec}"] = sorted(set(report["steps"]))
            out[f"pipe-tokens/{name}/{spec}"] = report["tokens_per_step"]
        remove_safe_dit(pipe)
        out[f"pipe/{name}"] = _delta(results["ulysses:2"], results[None])
    _image_to_video_cases(out)
    return out


def _image_to_video_cases(out: dict) -> None:
    """The image-to-video inputs dense-fp runs exactly, under the split too: HunyuanVideo 1.5's image-embed slots
    valid (non-zero ``image_embeds``), HunyuanVideo's latent concatenation."""
    from safe_dit.testing.hunyuan_video import build_hunyuan_video, hunyuan_video_inputs
    from safe_dit.testing.hunyuan_video15 import build_hunyuan_video15, hunyuan_video15_inputs

    for name, model in [
        ("hunyuan-video-1.5", build_hunyuan_video15()),
        ("hunyuan-video", build_hunyuan_video(image_condition_type="latent_concat", in_channels=9)),
    ]:
        x = hunyuan_video15_inputs(model, 4, 4, batch=2, text_len=TEXT, valid_lens=VALID, image=True) \
            if name == "hunyuan-video-1.5" else hunyuan_video_inputs(model, 4, 4, batch=2, text_len=TEXT,
                                                                     valid_lens=VALID)
        apply_safe_dit(model, SafeConfig("dense-fp"))
        one = _forward(model, x)
        apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp("ulysses:2")))
        out[f"i2v/{name}"] = _delta(_forward(model, x), one)
        remove_safe_dit(model)


@pytest.fixture(scope="module")
def results():
    from safe_dit.testing.parallel import launch

    return launch(f"{Path(__file__).resolve()}:cases", world=2, timeout=300)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spec", ["ulysses:2", "ring:2"])
def test_dense_fp_with_captions_of_different_lengths_equals_one_process(results, name, spec):
    assert results[f"dense-fp/{name}/{spec}"] <= TOL
    verdicts = results[f"verdicts/{name}/{spec}"]
    assert not any(v.startswith("kept") for v in verdicts), verdicts  # no mask reaches a kernel
    assert f"rewritten: split-batch (exact) {SPLIT}" in verdicts, verdicts  # caption padding, under the split


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_attends_its_own_half_of_the_video_tokens(results, name):
    assert results[f"rows/{name}"] == [16, 16]  # 32 video tokens: rank 0's 16 under ulysses, then under ring


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spec", ["ulysses:2", "ring:2"])
def test_safe_core_with_captions_of_different_lengths_equals_one_process(results, name, spec):
    assert results[f"safe-core/{name}/{spec}"] <= TOL
    assert {"warmup", "anchor", "selective"} <= set(results[f"kinds/{name}/{spec}"])
    assert results[f"kinds/{name}/{spec}"] == results[f"kinds/{name}/None"]


@pytest.mark.parametrize("name", NAMES)
def test_safe_core_through_the_pipelines_two_cfg_calls_equals_one_process(results, name):
    assert results[f"pipe/{name}"] <= TOL
    assert {"warmup", "anchor", "selective"} <= set(results[f"pipe-kinds/{name}/ulysses:2"])
    tokens = results[f"pipe-tokens/{name}/ulysses:2"]
    assert tokens == results[f"pipe-tokens/{name}/None"] and min(tokens) < max(tokens)  # the global top-K


@pytest.mark.parametrize("name", NAMES)
def test_image_to_video_under_dense_fp_equals_one_process(results, name):
    assert results[f"i2v/{name}"] <= TOL


def test_token_replace_image_to_video_is_refused_under_context_parallelism():
    """Refused at apply time, before the process group is asked for (one process, no launch)."""
    from safe_dit.testing.hunyuan_video import build_hunyuan_video

    model = build_hunyuan_video(image_condition_type="token_replace")
    with pytest.raises(SafeDitError, match="token_replace"):
        apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp("ulysses:2")))
    assert not hasattr(model, "_safe_dit_handle")
