"""benchmarks/summarize_backbones.py reports exactly the ratios stored in the e2e results it reads."""

import json
from pathlib import Path

import pytest

from helpers import load_benchmark_script

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def summarize():
    return load_benchmark_script("summarize_backbones")


def _fake_e2e(path, label, gains, env=None):
    path.write_text(json.dumps({
        "benchmark": "e2e",
        "environment": env or {"processor": "test cpu", "device": "cpu"},
        "settings": {"model_label": label, "steps": 7, "repeats": 2, "hidden_size": 64, "heads": 2, "layers": 1},
        "summary": [{"tokens": t, "fast_path_gain": a, "scheduling_gain": b, "total_gain": a * b}
                    for t, (a, b) in gains.items()] + [{"largest_tokens_that_ran": {}}],
    }))
    return str(path)


def test_table_and_plot_carry_each_runs_own_ratios(summarize, tmp_path, capsys):
    f1 = _fake_e2e(tmp_path / "a.json", "SD3", {4096: (1.0, 1.5), 9216: (0.98, 1.8)})
    f2 = _fake_e2e(tmp_path / "b.json", "FLUX", {4096: (1.1, 1.25)})
    png = tmp_path / "b.png"
    assert summarize.main([f1, f2, "--plot", str(png)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| FLUX") or ln.startswith("| SD3")]
    assert lines == [
        "| FLUX | 4096 | 7 | 2 | 1.10x | 1.25x | 1.38x | cpu, test cpu | b.json |",
        "| SD3 | 4096 | 7 | 2 | 1.00x | 1.50x | 1.50x | cpu, test cpu | a.json |",
        "| SD3 | 9216 | 7 | 2 | 0.98x | 1.80x | 1.76x | cpu, test cpu | a.json |",
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cuda_runs_are_labelled_by_their_gpu(summarize, tmp_path, capsys):
    f = _fake_e2e(tmp_path / "g.json", "SD3", {4096: (1.02, 1.4)},
                  env={"processor": "host cpu", "device": "cuda", "gpu": "NVIDIA H200"})
    summarize.main([f])
    assert "| SD3 | 4096 | 7 | 2 | 1.02x | 1.40x | 1.43x | cuda, NVIDIA H200 | g.json |" in capsys.readouterr().out


def test_refuses_other_results(summarize, tmp_path):
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"benchmark": "midt"}))
    with pytest.raises(SystemExit, match="not a `safe-dit bench e2e` result"):
        summarize.main([str(other)])


def test_committed_results_are_readable(summarize, capsys):
    files = sorted(str(p) for p in RESULTS.glob("e2e-cpu*.json"))
    assert files, "no committed e2e results"
    summarize.main(files)
    out = capsys.readouterr().out
    for backbone in ("SD3", "FLUX", "PixArt", "Lumina-Next"):
        assert f"| {backbone} | 4096 |" in out


def test_machine_names_are_shortened_for_tick_labels(summarize):
    assert summarize._short("Intel(R) Xeon(R) Processor") == "Intel Xeon"
    assert summarize._short("AMD EPYC 7B13 64-Core Processor") == "AMD EPYC"
    assert summarize._short(None) == "unknown"
