"""Context parallelism on CPU: 2 gloo processes on 127.0.0.1 against one process, and the refusals.

One launch (``cases`` below, run in both ranks) computes every case, single-process references included; the
tests read its results. Each rank computes the one-process reference on its own full copy of the model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.adapters.contract import _REGISTRY, Adapter, context_parallel_adapters
from safe_dit.testing.kits import KITS, kit_for

TOL = 1e-5
DEVICE = os.environ.get("SAFE_DIT_CP_DEVICE", "cpu")  # the cases on CUDA/NCCL: benchmarks/run_cp_gpu.sh
BACKBONES = tuple(name for name in context_parallel_adapters() if name in KITS)  # every adapter with a kit
# Captions of different lengths in one batch: 40 tokens with 38 and 3 valid (different even after Z-Image's
# padding to multiples of 32), so that every backbone with caption key padding gets its mask
TEXT, VALID = 40, [38, 3]


def _cp(spec: str):
    from diffusers import ContextParallelConfig

    kind, degree = spec.split(":")
    ring = kind.startswith("ring")
    return ContextParallelConfig(ring_degree=int(degree) if ring else 1, ulysses_degree=1 if ring else int(degree),
                                 ulysses_anything=kind == "ulysses_anything", ring_anything=kind == "ring_anything")


def _delta(a, b) -> float:
    return float((a - b).abs().max())


def _refused(fn) -> str | None:
    """The SafeDitError message ``fn`` raises (None if it raised nothing)."""
    try:
        fn()
    except SafeDitError as err:
        return str(err)
    return None


def _forward(model, x):
    with torch.no_grad():
        out = model(**x)[0]
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image: one tensor per sample


def _dense_fp_cases(out: dict) -> None:
    """dense-fp forwards (CFG-sized batch 2, padded captions where the backbone has them) vs one process."""
    shapes = {"ulysses:2": (4, 4), "ring:2": (4, 4), "ulysses_anything:2": (3, 5), "ring_anything:2": (3, 5)}
    for name in BACKBONES:
        kit = kit_for(name)
        model = kit.build().to(DEVICE)
        for spec, (h, w) in shapes.items():
            text, valid = (TEXT, VALID) if spec in ("ulysses:2", "ring:2") else (7, [5, 3])
            x = kit.inputs(model, h, w, batch=2, text_len=text, valid_lens=valid, device=DEVICE)
            if name == "lumina-next":  # proportional attention, as LuminaPipeline calls it: its scale needs global N
                x["cross_attention_kwargs"] = {"base_sequence_length": 4}
            apply_safe_dit(model, SafeConfig("dense-fp"))
            one = _forward(model, x)
            apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp(spec)))
            runtime = model._safe_dit_handle.runtime
            runtime.trace = []  # each attention call's mask verdict: the path that ran
            out[f"dense-fp/{name}/{spec}"] = _delta(_forward(model, x), one)
            out[f"verdicts/{name}/{spec}"] = sorted({verdict for _, verdict in runtime.trace})
            remove_safe_dit(model)


def _safe_core_cases(out: dict) -> None:
    """Whole tiny-pipeline generations under safe-core (the default schedule: warm-up, anchors, selective and
    reuse steps, context forecast) vs one process; global top-K."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import RUNS

    runs = [(name, "ulysses:2", {}, {}) for name in BACKBONES]
    runs += [("lumina-next", "ring:2", {}, {}),
             ("lumina-next", "ulysses_anything:2", {}, dict(height=48, width=80)),  # 3 x 5 = 15 tokens
             ("lumina-next", "ulysses:2", dict(keep_ratio=0.04), {}),  # K = 1: a rank holds no sensitive row
             ("sd3", "ulysses:2", dict(keep_ratio=0.02), {}),
             ("lumina-next", "ulysses:2", dict(mode="safe-sw"), {})]  # SW-CFG on the gathered output
    for name, spec, knobs, size in runs:
        kit = kit_for(name)
        pipe = kit.pipeline().to(DEVICE)
        run = RUNS[name]
        config = dict(dict(mode="safe-core"), **knobs)
        apply_safe_dit(pipe, SafeConfig(**config))
        one = run(pipe, steps=10, **size)
        apply_safe_dit(pipe, SafeConfig(**config, context_parallel=_cp(spec)))
        sharded = run(pipe, steps=10, **size)
        report = pipe.transformer._safe_dit_handle.runtime.last_report
        remove_safe_dit(pipe)
        tag = "".join(f"/{k}={v}" for k, v in knobs.items()) + ("/odd-grid" if size else "")
        out[f"safe-core/{name}/{spec}{tag}"] = _delta(sharded, one)
        out[f"kinds/{name}/{spec}{tag}"] = sorted(set(report["steps"]))


def _padded_batch_cases(out: dict) -> None:
    """safe-core on the bare transformer, a batch of two captions of different lengths (their padding rewritten
    exactly under the split), 4 steps inside safe_dit.generation (warm-up, anchors, selective steps) vs one process."""
    knobs = dict(keep_ratio=0.3, warmup_steps=1, anchor_interval=2, tail_dense_steps=0)
    for name in BACKBONES:
        kit = kit_for(name)
        model = kit.build().to(DEVICE)
        x = kit.inputs(model, 4, 4, batch=2, text_len=TEXT, valid_lens=VALID, device=DEVICE)
        outs = {}
        for spec in (None, "ulysses:2", "ring:2"):
            apply_safe_dit(model, SafeConfig("safe-core", **knobs, context_parallel=spec and _cp(spec)))
            with safe_dit.generation(model, num_steps=4):
                outs[spec] = torch.stack([_forward(model, x) for _ in range(4)])
            out[f"kinds-padded/{name}/{spec}"] = sorted(set(model._safe_dit_handle.runtime.last_report["steps"]))
            remove_safe_dit(model)
        for spec in ("ulysses:2", "ring:2"):
            out[f"safe-core-padded/{name}/{spec}"] = _delta(outs[spec], outs[None])


def _refusal_cases(out: dict) -> None:
    from diffusers import ContextParallelConfig

    if DEVICE != "cpu":
        return  # these run on the CPU only (the device-count workaround below is a CPU one)
    flux = kit_for("flux")
    x = flux.inputs(flux.build(), 4, 4)

    # diffusers' own enable_parallelism: the CPU needs diffusers' rank % device_count() to divide (test-only)
    torch.accelerator.device_count = lambda: 1
    stock_model = flux.build()
    one = _forward(stock_model, x)
    stock_model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    out["stock-flux-cp"] = _delta(_forward(stock_model, x), one)
    out["enable-then-apply"] = _refused(lambda: apply_safe_dit(stock_model, SafeConfig("dense-fp")))

    patched = apply_safe_dit(flux.build(), SafeConfig("dense-fp"))
    patched.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    out["apply-then-enable"] = _refused(lambda: _forward(patched, x))
    remove_safe_dit(patched)  # the stock processors take the parallel config enable_parallelism gave safe-dit's
    out["apply-enable-remove"] = _delta(_forward(patched, x), one)

    # a mask of unknown origin on sequence attention (a user's FLUX joint mask): refused under ulysses and ring
    masked = dict(x, joint_attention_kwargs={"attention_mask": torch.ones(1, 8 + 16, dtype=torch.bool)})
    for spec in ("ulysses:2", "ring:2"):
        model = apply_safe_dit(flux.build(), SafeConfig("dense-fp", context_parallel=_cp(spec)))
        out[f"mask/{spec}"] = _refused(lambda: _forward(model, masked))

    # lengths and heads the degree does not divide: refused without *_anything, exact with it
    lumina = kit_for("lumina-next")
    model = lumina.build()
    x9 = lumina.inputs(model, 3, 3)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    one = _forward(model, x9)
    apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp("ulysses:2")))
    out["odd-length/ulysses"] = _refused(lambda: _forward(model, x9))
    apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp("ulysses_anything:2")))
    out["odd-length/ulysses_anything"] = _delta(_forward(model, x9), one)
    remove_safe_dit(model)
    odd_heads = lumina.build(num_attention_heads=3, num_kv_heads=3, hidden_size=48)
    out["odd-heads/ulysses"] = _refused(lambda: apply_safe_dit(odd_heads, SafeConfig(
        "dense-fp", context_parallel=_cp("ulysses:2"))))
    x3 = lumina.inputs(odd_heads, 4, 4)
    one = _forward(odd_heads, x3)
    apply_safe_dit(odd_heads, SafeConfig("dense-fp", context_parallel=_cp("ulysses_anything:2")))
    out["odd-heads/ulysses_anything"] = _delta(_forward(odd_heads, x3), one)
    remove_safe_dit(odd_heads)
    out["odd-heads/removed"] = _delta(_forward(odd_heads, x3), one)


def cases(rank: int, world: int) -> dict:
    out: dict = {}
    if world != 2:
        raise RuntimeError("the cases are written for 2 ranks (ulysses:2, ring:2, ...)")
    _dense_fp_cases(out)
    _safe_core_cases(out)
    _padded_batch_cases(out)
    _refusal_cases(out)
    return out


@pytest.fixture(scope="module")
def results():
    from safe_dit.testing.parallel import launch

    return launch(f"{Path(__file__).resolve()}:cases", world=2, timeout=300)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("spec", ["ulysses:2", "ring:2", "ulysses_anything:2", "ring_anything:2"])
def test_dense_fp_under_context_parallelism_equals_one_process(results, name, spec):
    assert results[f"dense-fp/{name}/{spec}"] <= TOL


@pytest.mark.parametrize("spec", ["ulysses:2", "ring:2"])
def test_no_mask_is_kept_and_caption_padding_is_rewritten_under_the_split(results, spec):
    verdicts = {name: results[f"verdicts/{name}/{spec}"] for name in BACKBONES}
    assert all(not v.startswith("kept") for vs in verdicts.values() for v in vs), verdicts
    for name in ("lumina2", "qwen-image", "z-image"):  # caption key padding in the joint blocks, captions replicated
        if name in verdicts:
            assert "rewritten: split-batch (exact) (captions replicated, image keys sequence-parallel)" in \
                verdicts[name], verdicts[name]


def test_safe_core_under_context_parallelism_equals_one_process(results):
    core = {k: v for k, v in results.items() if k.startswith("safe-core/")}
    assert len(core) == len(BACKBONES) + 5 and all(v <= TOL for v in core.values()), core
    kinds = {k: v for k, v in results.items() if k.startswith("kinds/")}
    assert all({"warmup", "anchor", "selective"} <= set(v) for v in kinds.values()), kinds


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("spec", ["ulysses:2", "ring:2"])
def test_safe_core_with_captions_of_different_lengths_equals_one_process(results, name, spec):
    assert results[f"safe-core-padded/{name}/{spec}"] <= TOL
    assert {"warmup", "anchor", "selective"} <= set(results[f"kinds-padded/{name}/{spec}"])


def test_diffusers_parallelism_on_a_patched_model_is_refused_in_both_orders(results):
    assert results["stock-flux-cp"] <= TOL  # diffusers' own CP is right on the stock model
    assert "enable_parallelism" in results["enable-then-apply"]
    assert "enable_parallelism" in results["apply-then-enable"]
    assert results["apply-enable-remove"] <= TOL  # removed: the stock model runs correctly split


@pytest.mark.parametrize("spec", ["ulysses:2", "ring:2"])
def test_a_mask_of_unknown_origin_is_refused_on_sequence_attention(results, spec):
    assert "mask would reach a sequence-parallel attention" in results[f"mask/{spec}"]


def test_lengths_and_heads_the_degree_does_not_divide(results):
    assert "do not split evenly" in results["odd-length/ulysses"]
    assert results["odd-length/ulysses_anything"] <= TOL
    assert "not divisible by ulysses degree" in results["odd-heads/ulysses"]
    assert results["odd-heads/ulysses_anything"] <= TOL
    assert results["odd-heads/removed"] <= TOL


# -- without a process group (this process) ------------------------------------------------------------

def test_refused_without_a_process_group():
    model = kit_for("lumina-next").build()
    with pytest.raises(SafeDitError, match="process group"):
        apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp("ulysses:2")))
    assert not hasattr(model, "_safe_dit_handle")


def test_config_refusals():
    with pytest.raises(SafeDitError, match="stock model"):
        SafeConfig("dense", context_parallel=_cp("ulysses:2"))
    with pytest.raises(SafeDitError, match="cannot be sharded"):
        SafeConfig("safe-core", mask_elision=False, context_parallel=_cp("ulysses:2"))
    with pytest.raises(SafeDitError, match="ContextParallelConfig"):
        SafeConfig("dense-fp", context_parallel="ulysses:2")


@pytest.mark.parametrize("adapter", _REGISTRY, ids=lambda a: a.name)
def test_every_adapter_declares_its_split_points(adapter):
    assert adapter.context_parallel, f"{adapter.name} refuses context_parallel (no split points declared)"
    assert adapter.name in KITS, f"{adapter.name} has no kit, so the 2-process cases above do not cover it"


def test_an_adapter_without_split_points_is_refused_naming_those_that_have_them():
    class Undeclared(Adapter):  # not registered
        name = "undeclared"

    with pytest.raises(SafeDitError, match="not supported for undeclared") as err:
        Undeclared().attach(torch.nn.Linear(2, 2), SafeConfig("dense-fp", context_parallel=_cp("ulysses:2")))
    assert all(name in str(err.value) for name in context_parallel_adapters())


def test_no_context_parallel_costs_nothing():
    """context_parallel=None: no parallel state, no extra hooks, the dispatcher called exactly as before."""
    kit = kit_for("flux")
    model = kit.build()
    apply_safe_dit(model, SafeConfig("safe-core"))
    runtime = model._safe_dit_handle.runtime
    assert runtime.parallel is None
    assert len(model.proj_out._forward_hooks) == 1 and len(model.x_embedder._forward_hooks) == 1  # SRSU's own only
    assert len(model.context_embedder._forward_hooks) == 0 and len(model.pos_embed._forward_hooks) == 0
    remove_safe_dit(model)


def test_processors_left_stock_are_refused_under_the_split():
    """FLUX's IP-Adapter processors stay stock under dense-fp; under the split they would attend one rank's shard."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    model = kit_for("flux").build()
    cfg = model.config
    names = [n for n, m in model.named_modules() if hasattr(m, "set_processor")]
    ip = FluxIPAdapterAttnProcessor(cfg.num_attention_heads * cfg.attention_head_dim, cfg.joint_attention_dim)
    model.set_attn_processor({f"{n}.processor": ip if n.startswith("transformer_blocks") else FluxAttnProcessor()
                              for n in names})
    with pytest.raises(SafeDitError, match="FluxIPAdapterAttnProcessor.*only this rank's tokens"):
        apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp("ulysses:2")))
    assert not hasattr(model, "_safe_dit_handle")
