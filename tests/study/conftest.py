"""The study tool's fixtures: one 6-pair study on the embedded model (4 steps, made once), a CLI runner,
and a live ``safe-dit study serve`` subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def make_args(*argv: str):
    """The parsed arguments of ``safe-dit study make ARGV``."""
    from safe_dit.cli import build_parser

    words = ["study", "make", *argv]
    return build_parser(words).parse_args(words)


@pytest.fixture(scope="session")
def study_dir(embedded_pipe, tmp_path_factory) -> Path:
    """dense-fp vs safe-core, 3 one-object + 3 two-object world prompts, 4 steps, made through the command's
    own code with the session's embedded pipeline (treat as read-only: votes go to each test's --db)."""
    from safe_dit.embedded.model import weights_identity
    from safe_dit.study import make

    out = tmp_path_factory.mktemp("study") / "six"
    args = make_args("--a", "dense-fp", "--b", "safe-core", "--single", "3", "--two", "3", "--steps", "4",
                     "--seed", "5", "--out", str(out), "--no-progress")
    assert make.run(args, pipe=embedded_pipe, weights=weights_identity()) == 0
    return out


@pytest.fixture
def cli(capsys):
    """``cli(*argv)`` -> (exit code, stdout, stderr) of the in-process CLI."""
    from safe_dit.cli import main

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


class Server:
    """``safe-dit study serve`` in a subprocess on a free port; ``kill()`` is SIGKILL (no clean-up runs)."""

    def __init__(self, study: Path, db: Path):
        self.study, self.db = study, db
        self.proc = None
        self.url = None

    def start(self) -> "Server":
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "safe_dit.cli", "study", "serve", str(self.study),
                                      "--port", "0", "--db", str(self.db)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            found = re.search(r"http://\S+/", line)
            if found:
                self.url = found.group(0).rstrip("/")
                return self
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"the server did not start: {line!r} (exit {self.proc.poll()})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def server(study_dir, tmp_path):
    """A started live server of the 6-pair study with its votes in this test's tmp_path."""
    s = Server(study_dir, tmp_path / "votes.sqlite").start()
    yield s
    s.stop()
