"""What ``eval`` (and generate, bench e2e) tell a user about their numbers: a schedule with no selective step is
warned about; a scheduled mode slower than dense on the small embedded model is explained, with the figure at
scale read from the committed end-to-end result."""

from __future__ import annotations

import json
import logging

from safe_dit.bench import quality
from safe_dit.bench.runs import selective_free
from safe_dit.cli import main
from safe_dit.config import SafeConfig


def test_a_schedule_without_a_selective_step_is_named():
    line = selective_free(SafeConfig("safe-core"), 1)
    assert "no selective step" in line and "(the schedule: warmup)" in line and "--steps 3" in line
    assert selective_free(SafeConfig("safe-core"), 3) is None  # warm-up, warm-up, the final selective step
    assert selective_free(SafeConfig("safe-core"), 30) is None
    assert selective_free(SafeConfig("dense-fp"), 1) is None  # not a scheduled mode: nothing to warn about
    assert "--steps 6" in selective_free(SafeConfig("safe-sw", warmup_steps=5), 4)


def test_eval_with_one_step_warns(micro_model, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--model", str(micro_model(1)), "--single", "1", "--two", "0", "--steps", "1",
                     "--modes", "safe-core", "--no-progress"]) == 0
    warned = [r.getMessage() for r in caplog.records if "no selective step" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("safe-core with 1 step")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["modes"]["safe-core"]["token_fraction"] == 1.0  # what the warning says: every token computed


def _result(speedup):
    return {"modes": {"dense": {"speedup": 1.0}, "safe-core": {"speedup": speedup}, "safe-sw": {"speedup": 1.2}},
            "settings": {"size": 64}}


def test_a_slower_safe_core_is_explained_with_the_committed_figure_at_scale(tmp_path):
    committed = json.loads(quality.AT_SCALE.read_text())
    row = max((r for r in committed["summary"] if "total_gain" in r), key=lambda r: r["tokens"])
    note = quality.overhead_note(_result(0.96))
    assert note.startswith("note: safe-core 0.96x dense here") and "256 image tokens" in note and "\n" not in note
    assert f"at {row['tokens']} tokens safe-core ran {row['total_gain']:.2f}x dense" in note
    assert "benchmarks/results/e2e-cpu.json" in note
    other = tmp_path / "e2e.json"  # another result file: the note follows it (nothing hard-coded)
    other.write_text(json.dumps({"settings": {"model_label": "X"}, "environment": {"device": "cpu"},
                                 "summary": [{"tokens": 9216, "total_gain": 7.5}]}))
    assert "at 9216 tokens safe-core ran 7.50x dense (X, cpu" in quality.overhead_note(_result(0.9), other)
    assert quality.overhead_note(_result(0.9), tmp_path / "absent.json").endswith("`safe-dit bench e2e` measures it "
                                                                                  "at scale")
    assert quality.overhead_note(_result(1.4)) is None  # faster than dense: nothing to explain
