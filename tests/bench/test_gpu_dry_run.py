"""benchmarks/run_gpu.sh --dry-run runs every step of the GPU suite at tiny shapes on the CPU and writes its files;
the printed H200 budget comes first and fits 9 minutes; the estimate scales the committed H200 runs by a FLOP model
that agrees with torch's own counts."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from safe_dit.bench import gpu_budget, gpu_report, gpu_steps
from safe_dit.commands import gpu_suite
from safe_dit.testing.kits import KITS

ROOT = Path(__file__).resolve().parents[2]
MODES = ("dense", "dense-fp", "safe-core")


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_budget_is_printed_first_and_fits_nine_minutes(dry):
    _, stdout = dry
    lines = stdout.splitlines()
    assert lines[0].startswith("GPU suite budget for one H200")
    total = next(ln for ln in lines if "total estimate" in ln)
    assert lines.index(total) < next(i for i, ln in enumerate(lines) if ln.startswith("== "))
    seconds = float(re.search(r"total estimate (\d+) s", total).group(1))
    assert 60 < seconds <= 9 * 60
    rows = gpu_budget.plan(gpu_steps.STEPS, gpu_steps.RESULTS, "gpu")
    assert gpu_budget.plan_total(rows) <= gpu_budget.BUDGET_S == 540
    for step, row in zip(gpu_steps.STEPS, rows):  # every step but the optional ones fits (Wan too, once its kit lands)
        assert row["admitted"] or step.optional or row["estimate_s"] is None, row


def test_every_step_ran_and_wrote_its_files(dry):
    out, stdout = dry
    suite = json.loads((out / "gpu-suite-gpu.json").read_text())
    assert suite["dry_run"] and suite["environment"]["torch"] == torch.__version__
    assert [s["step"] for s in suite["steps"]] == [s.name for s in gpu_steps.STEPS]
    for step, row in zip(gpu_steps.STEPS, suite["steps"]):
        if isinstance(step, gpu_steps.MidtStep):
            assert row["status"] == "ok", row
            midt = json.loads((out / "midt-gpu.json").read_text())
            assert {c["mask"] for c in midt["cases"]} == set(midt["settings"]["masks"]) and len(midt["cases"]) >= 10
            assert all(c["masked_kernels"] and c["maskless_ms"] > 0 for c in midt["cases"])
            assert (out / "midt-gpu.png").read_bytes()[:4] == b"\x89PNG" and (out / "midt-gpu.txt").is_file()
            continue
        if step.model not in KITS:  # Wan until its kit lands: skipped with the reason
            assert row["status"] == "skipped" and "kit" in row["reason"]
            assert f"== {step.name}: skipped: no `{step.model}` kit" in stdout
            continue
        assert row["status"] == "ok", row
        result = json.loads((out / f"e2e-gpu-{step.name}.json").read_text())
        assert result["settings"]["model"] == step.model and result["settings"]["steps"] == 4
        assert result["environment"]["diffusers"] and result["settings"]["dtype"] == "float32"
        by = {r["mode"]: r for r in result["rows"]}
        assert set(by) == set(MODES)
        for mode in MODES:
            assert by[mode]["status"] == "ok" and by[mode]["peak_memory_mb"] is not None
            assert by[mode]["seconds"] > 0 if step.timed else by[mode]["seconds"] is None
        assert by["dense-fp"]["max_abs_err_vs_dense_short_call"] <= 1e-4
        assert by["dense"]["attention_kernels"] and by["dense-fp"]["attention_kernels"]
        assert any("gain" in k for s in result["summary"] for k in s) == step.timed
        assert (out / f"e2e-gpu-{step.name}.txt").read_text().startswith(" tokens")
        assert (out / f"e2e-gpu-{step.name}.png").read_bytes()[:4] == b"\x89PNG"
        # the correctness check is printed before the step's timing table
        block = stdout.split(f"== {step.name}: {step.what}", 1)[1]
        assert block.index("check dense-fp vs dense (before timing)") < block.index(" tokens   res mode")
    assert (out / "gpu-suite-gpu.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "gpu-suite-gpu.md").read_text()
    assert page.startswith("# GPU suite (dry run") and gpu_report.markdown_table(suite) in page


def test_table_regenerates_from_the_suite_json(dry, capsys):
    out, _ = dry
    suite = json.loads((out / "gpu-suite-gpu.json").read_text())
    assert gpu_suite.main(["--table", str(out / "gpu-suite-gpu.json")]) == 0
    table = capsys.readouterr().out
    assert table.strip() == gpu_report.markdown_table(suite).strip()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    for s in suite["steps"]:
        if s["status"] == "ok" and "rows" in s:  # one row per bench e2e step, with its three timings
            row = next(ln for ln in rows if ln.startswith(f"| {s['settings']['model_label']} |"))
            assert row.count(" | ") == 13 and " - |" not in row.split("|")[7]
    assert any(ln.startswith("| head dim | N | bool-full") for ln in rows)  # the MIDT table


def test_a_step_past_the_budget_is_skipped_with_its_reason(tmp_path):
    steps = [s for s in gpu_steps.STEPS if s.name in ("sd3-1024", "flux-1024")]
    est = {r["step"]: r["estimate_s"] for r in gpu_budget.plan(steps, gpu_steps.RESULTS, "gpu")}
    budget = gpu_budget.PROCESS_S + est["sd3-1024"] + est["flux-1024"] / 2  # room for SD3 only
    logs = []
    suite = gpu_suite.run_suite(steps, tmp_path, "t", budget, True, "cpu", log=logs.append)
    status = {s["step"]: s for s in suite["steps"]}
    assert status["sd3-1024"]["status"] == "ok"
    assert status["flux-1024"]["status"] == "skipped" and "exceeds" in status["flux-1024"]["reason"]
    assert (tmp_path / "e2e-t-sd3-1024.json").is_file() and not (tmp_path / "e2e-t-flux-1024.json").exists()


@pytest.mark.parametrize("dry", [False, True])
def test_every_step_asks_bench_e2e_for_a_grid_it_takes(dry):
    """bench e2e's --tokens counts all frames' tokens (frames x side x side, side a multiple of 8); the plan's token
    count is the same number."""
    rows = {r["step"]: r for r in gpu_budget.plan(gpu_steps.STEPS, gpu_steps.RESULTS, "gpu")}
    for step in gpu_steps.STEPS:
        if isinstance(step, gpu_steps.MidtStep):
            continue
        tokens, frames = gpu_steps.run_shape(step, dry)
        side = math.isqrt(tokens // frames)
        assert frames * side * side == tokens and side % 8 == 0, (step.name, tokens, frames)
        if not dry:
            assert rows[step.name]["tokens"] == tokens


def _ref_seconds(name, tokens):
    result = json.loads((gpu_steps.RESULTS / name).read_text())
    return result["settings"]["steps"], {r["mode"]: r["seconds"] for r in result["rows"] if r["tokens"] == tokens}


def test_estimate_scales_the_committed_run_by_flops(tmp_path):
    step = next(s for s in gpu_steps.STEPS if s.name == "lumina-next-1024")  # the reference's own shape: ratio 1
    est = gpu_budget.estimate(step, tmp_path)  # no earlier suite result there: the committed references
    ref_steps, sec = _ref_seconds("e2e-gpu.json", 4096)
    short = gpu_budget.short_steps(step.steps)
    for mode in MODES:
        calls = step.repeats * step.steps + 2 * short + (mode != "safe-core")
        assert est["per_mode"][mode] == pytest.approx(sec[mode] / ref_steps * calls, rel=1e-9)
    flux = next(s for s in gpu_steps.STEPS if s.name == "flux-1024")  # 4 + 4 blocks scaled to 19 + 38
    est = gpu_budget.estimate(flux, tmp_path)
    ref_steps, sec = _ref_seconds("e2e-gpu-flux.json", 4096)
    full = gpu_budget.forward_flops("flux", "flux-dev", {}, 4096, 512, 1)
    small = gpu_budget.forward_flops("flux", "flux-dev", {"num_layers": 4, "num_single_layers": 4}, 4096, 512, 1)
    assert 4 < full / small < 8
    calls = flux.repeats * flux.steps + 2 * gpu_budget.short_steps(flux.steps) + 1
    assert est["per_mode"]["dense"] == pytest.approx(sec["dense"] / ref_steps * full / small * calls, rel=1e-9)


@pytest.mark.parametrize("model", ["lumina-next", "sd3", "flux", "qwen-image"])
def test_flop_model_agrees_with_torch_counts(model, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    kit = KITS[model]
    transformer = kit.build("tiny")
    inputs = kit.inputs(transformer, 16, 16, batch=2, text_len=8)
    attention = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # 4·B·H·Lq·Lk·d per call: QKᵀ and PV
        q, k = kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if len(args) > 1 else None)
        attention.append(4 * q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2] * q.shape[-1])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    weights = gpu_budget.weight_flops(model, "tiny", {}, 256, 8, 2)
    total = gpu_budget.forward_flops(model, "tiny", {}, 256, 8, 2)
    assert weights == pytest.approx(counter.get_total_flops(), rel=0.1)  # CPU SDPA is not in torch's counter
    assert total - weights == pytest.approx(sum(attention), rel=0.1)


def test_an_earlier_result_of_the_step_is_its_own_reference(tmp_path):
    step = next(s for s in gpu_steps.STEPS if s.name == "lumina-next-1024")
    committed = gpu_budget.estimate(step, tmp_path)
    earlier = json.loads((gpu_steps.RESULTS / "e2e-gpu.json").read_text())
    for row in earlier["rows"]:  # the same shape, twice as slow
        row["seconds"] = row["seconds"] * 2 if row["seconds"] else None
    (tmp_path / "e2e-gpu-lumina-next-1024.json").write_text(json.dumps(earlier))
    own = gpu_budget.estimate(step, tmp_path)
    assert own["refs"] == ["e2e-gpu-lumina-next-1024.json"]
    for mode in MODES:
        assert own["per_mode"][mode] == pytest.approx(2 * committed["per_mode"][mode], rel=1e-9)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
