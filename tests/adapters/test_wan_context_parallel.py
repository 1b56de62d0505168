"""Wan under context parallelism: 2 gloo processes on 127.0.0.1 against one process (dense-fp forwards; safe-core
and safe-sw through WanPipeline's two CFG calls per step; Wan 2.2's two transformers across the switch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit

TOL = 1e-5


def _cp(spec: str):
    from diffusers import ContextParallelConfig

    kind, degree = spec.split(":")
    ring = kind.startswith("ring")
    return ContextParallelConfig(ring_degree=int(degree) if ring else 1, ulysses_degree=1 if ring else int(degree),
                                 ulysses_anything=kind == "ulysses_anything", ring_anything=kind == "ring_anything")


def _delta(a, b) -> float:
    return float((a - b).abs().max())


def cases(rank: int, world: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from safe_dit.testing.wan import build_wan, build_wan22_pipeline, build_wan_pipeline, wan_inputs

    from helpers import RUNS

    out: dict = {}
    model = build_wan()
    for spec, (h, w) in {"ulysses:2": (4, 6), "ring:2": (4, 6), "ulysses_anything:2": (3, 5),
                         "ring_anything:2": (3, 5)}.items():
        x = wan_inputs(model, h, w, batch=2, valid_lens=[8, 3], frames=3)  # 72 or 45 tokens
        rows = []
        spy = model.blocks[0].attn1.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[1]))
        with torch.no_grad():
            apply_safe_dit(model, SafeConfig("dense-fp"))
            one = model(**x)[0]
            apply_safe_dit(model, SafeConfig("dense-fp", context_parallel=_cp(spec)))
            out[f"dense-fp/{spec}"] = _delta(model(**x)[0], one)
        spy.remove()
        remove_safe_dit(model)
        out[f"rows/{spec}"] = rows  # self-attention query rows: all tokens in one process, this rank's under CP

    run = RUNS["wan"]  # guidance 4: a conditional and an unconditional call per step
    for name, build, config in [
        ("safe-core", build_wan_pipeline, dict(mode="safe-core")),
        ("safe-sw", build_wan_pipeline, dict(mode="safe-sw", keep_ratio=0.25)),
        ("wan2.2/safe-core", build_wan22_pipeline, dict(mode="safe-core")),
    ]:
        pipe = build()
        apply_safe_dit(pipe, SafeConfig(**config))
        one = run(pipe)
        apply_safe_dit(pipe, SafeConfig(**config, context_parallel=_cp("ulysses:2")))
        sharded = run(pipe)
        report = pipe.transformer._safe_dit_handle.runtime.last_report
        remove_safe_dit(pipe)
        out[name] = _delta(sharded, one)
        out[f"kinds/{name}"] = sorted(set(report["steps"]))
    return out


@pytest.fixture(scope="module")
def results():
    from safe_dit.testing.parallel import launch

    return launch(f"{Path(__file__).resolve()}:cases", world=2, timeout=300)


@pytest.mark.parametrize("spec", ["ulysses:2", "ring:2", "ulysses_anything:2", "ring_anything:2"])
def test_dense_fp_under_context_parallelism_equals_one_process(results, spec):
    assert results[f"dense-fp/{spec}"] <= TOL
    n = 72 if spec in ("ulysses:2", "ring:2") else 45
    assert results[f"rows/{spec}"] == [n, -(-n // 2)]  # rank 0 holds the first half (diffusers' tensor_split)


@pytest.mark.parametrize("name", ["safe-core", "safe-sw", "wan2.2/safe-core"])
def test_scheduled_pipelines_under_context_parallelism_equal_one_process(results, name):
    assert results[name] <= TOL
    assert {"warmup", "anchor", "selective"} <= set(results[f"kinds/{name}"])


def test_per_token_timesteps_are_refused_under_context_parallelism():
    from safe_dit.testing.wan import build_wan, wan_inputs

    model = build_wan()
    x = wan_inputs(model, 4, 6, frames=2)
    x["timestep"] = x["timestep"][:, None].expand(-1, 2 * 4 * 6)

    class Parallel:  # the hook reads only whether the runtime is split
        pass

    apply_safe_dit(model, SafeConfig("dense-fp"))
    model._safe_dit_handle.runtime.parallel = Parallel()
    with pytest.raises(SafeDitError, match="per-token"), torch.no_grad():
        model(**x)
    remove_safe_dit(model)
