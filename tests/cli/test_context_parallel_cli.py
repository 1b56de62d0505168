"""``--context-parallel`` on the command line: under torchrun (2 gloo processes) ``generate`` writes, from rank 0
only, the image one process writes; without torchrun it is refused before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from safe_dit.cli import main
from safe_dit.testing.parallel import free_port

ARGS = ["generate", "a red circle", "--model", "tiny-random", "--steps", "6"]


def _env():
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.abspath(src))


def test_generate_under_torchrun_equals_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "safe_dit.cli"]
    cp = subprocess.run(torchrun + ARGS + ["--context-parallel", "ulysses:2", "--out", str(tmp_path / "cp" / "x.png")],
                        env=_env(), capture_output=True, text=True, timeout=180)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert main(ARGS + ["--out", str(tmp_path / "one" / "x.png")]) == 0  # one process (this one)
    summary = json.loads((tmp_path / "cp" / "x.json").read_text())
    assert summary["config"]["context_parallel"] == "ulysses:2" and "selective" in summary["step_kinds"]
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == ["x.json", "x.png", "x.sensitivity.png"]
    assert cp.stdout.count("wrote ") == 3  # rank 0 alone: one line per file
    a, b = (np.asarray(Image.open(tmp_path / d / "x.png")).astype(int) for d in ("cp", "one"))
    assert np.abs(a - b).max() == 0


@pytest.mark.parametrize("command", [ARGS, ["bench", "e2e", "--quick"]])
def test_context_parallel_without_torchrun_is_refused(command, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(command + ["--context-parallel", "ulysses:2"]) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_context_parallel_spec_is_checked():
    from safe_dit.bench.runs import parse_context_parallel
    from safe_dit.config import SafeDitError

    assert parse_context_parallel("ring_anything:2").ring_anything
    for bad in ("ulysses", "ulysses:1", "tensor:2", "ring:x"):
        with pytest.raises(SafeDitError, match="MODE:DEGREE"):
            parse_context_parallel(bad)
