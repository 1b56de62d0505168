"""benchmarks/schedule_probe.py: candidates parse (bad ones refused in one line) and the per-step-kind cost fit
recovers the costs of fabricated Pareto timings exactly."""

import json

import pytest

from safe_dit import SafeConfig, SafeDitError
from safe_dit.bench.pareto_settings import CORE, SCHEDULE_FIELDS

from helpers import load_benchmark_script


@pytest.fixture(scope="module")
def probe():
    return load_benchmark_script("schedule_probe")


def test_candidates_parse_and_bad_ones_are_refused(probe):
    assert probe.parse_candidate("a3 r2=anchor_interval:3,anchor_growth:0") == (
        "a3 r2", {"anchor_interval": 3, "anchor_growth": 0.0})
    name, o = probe.parse_candidate("k=keep_ratio:0.25")
    assert o == {"keep_ratio": 0.25} and SafeConfig("safe-core", **(CORE | o)).keep_ratio == 0.25
    for bad in ("anchor_interval:3", "x=no_such_field:1", "x=anchor_interval"):
        with pytest.raises(SafeDitError):
            probe.parse_candidate(bad)


def test_step_mix_counts_every_step(probe):
    mix = probe.step_mix(SafeConfig("safe-core"), 30)
    assert mix["dense"] + mix["selective"] + mix["reuse"] == 30 and mix["reuse"] > 0
    periodic = probe.step_mix(SafeConfig("safe-core", anchor_interval=3, anchor_growth=0.0, reuse_every=0), 30)
    assert periodic["reuse"] == 0 and periodic["anchors"] == list(range(4, 30, 3))


def test_cost_fit_recovers_fabricated_costs(probe, tmp_path):
    a, b, c, steps = 0.8, 0.07, 0.5, 30
    configs = {"dense-fp": None, "s1": dict(keep_ratio=0.15), "s2": dict(keep_ratio=0.25, anchor_growth=0.0),
               "s3": dict(keep_ratio=0.1, reuse_every=0), "s4": dict(anchor_interval=3, anchor_growth=0.0)}
    settings, rows = [], {"dense": dict(status="ok", seconds=40.0)}
    for name, o in configs.items():
        if o is None:
            cfg, seconds = SafeConfig("dense-fp"), a * steps
        else:
            cfg = SafeConfig("safe-core", **(CORE | o))
            mix = probe.step_mix(cfg, steps)
            seconds = a * mix["dense"] + (b + c * cfg.keep_ratio) * mix["selective"]
        settings.append(dict(name=name, family="safe-dit", mode=cfg.mode, steps=steps,
                             config={k: getattr(cfg, k) for k in SCHEDULE_FIELDS}))
        rows[name] = dict(status="ok", seconds=seconds)
    # other steps: skipped
    settings.append(dict(name="x0.5", family="safe-dit", mode="safe-core", steps=15, config={}))
    rows["x0.5"] = dict(status="ok", seconds=1.0)
    path = tmp_path / "pareto.json"
    path.write_text(json.dumps(dict(settings=settings, settings_common=dict(steps=steps), scaled=dict(rows=rows))))
    costs = probe.fit_costs(str(path))
    assert costs["dense_step_s"] == pytest.approx(a) and costs["selective_step_s"] == pytest.approx(b)
    assert costs["selective_step_s_per_keep"] == pytest.approx(c) and set(costs["fit"]) == set(configs)
