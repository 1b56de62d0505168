"""Bad input, interrupts and API misuse fail early and clearly (the hardening issue): one-line errors, exit
codes, nothing half-written, nothing loaded for a check that needs no model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit
from safe_dit.cli import main

PROMPT = "a red circle at the center on a gray background"


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if a pipeline is loaded: every check below must come before any work."""
    from safe_dit.commands import generate

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(generate, "load_pipeline", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "inf"], "finite"), (["--guidance", "nan"], "finite"), (["--cfg-sensitive", "nan"], "finite"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"), (["--seed", str(2**64)], "--seed"),
    (["--device", "foo"], "not a torch device"), (["--device", "meta"], "meta"),
    (["--height", "100000"], "at most 6144"), (["--width", "4096", "--height", "8"], "multiples of 16"),
    (["--width", "4096", "--height", "16"], "at most 1536 pixels for the embedded model"),
    (["--model", "/nonexistent/pipe"], "no such directory"),
])
def test_bad_arguments_are_refused_before_any_work(extra, message, no_model, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["generate", PROMPT, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_out_paths_are_refused_before_any_work(no_model, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = {str(tmp_path): "must end in", str(tmp_path / "d.png"): "is a directory",
             str(tmp_path / "file" / "x.png"): "is a file", str(ro / "x.png"): "not writable"}
    (tmp_path / "d.png").mkdir()
    try:
        for out, message in cases.items():
            if message == "not writable" and os.geteuid() == 0:
                continue  # root writes anywhere
            assert main(["generate", PROMPT, "--out", out]) == 2, out
            assert message in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from safe_dit.commands import generate

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run", interrupted)
    assert main(["generate", PROMPT]) == 130
    assert capsys.readouterr().err.strip() == "safe-dit: interrupted"


def test_files_of_one_run_appear_together_and_the_json_names_the_images(tmp_path, capsys):
    out = tmp_path / "run" / "img.png"
    assert main(["generate", PROMPT, "--model", "tiny-random", "--steps", "3", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    import hashlib

    for path, digest in summary["sha256"].items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.json", "img.png", "img.sensitivity.png"]


def test_sigterm_leaves_no_temporary_file_and_no_partial_set(tmp_path):
    out = tmp_path / "img.png"
    proc = subprocess.Popen([sys.executable, "-m", "safe_dit.cli", "generate", PROMPT, "--model", "tiny-random",
                             "--steps", "100000", "--progress", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 120
    while b"it/s" not in seen and time.monotonic() < deadline:  # inside the sampling loop: the progress bar runs
        seen += proc.stderr.read1(4096)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = seen + err
    assert proc.returncode == 143, err.decode()[-500:]
    assert err.decode().rstrip().endswith("safe-dit: terminated")  # after the progress bar's last redraw
    assert list(tmp_path.iterdir()) == []  # no image, no map, no JSON, no .img.XXXX temporaries


def test_help_and_version_load_no_torch():
    code = ("import sys; from safe_dit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_unknown_pcsp_blocks_are_refused_at_apply():
    from safe_dit.testing.kits import build_lumina_next

    model = build_lumina_next()
    with pytest.raises(SafeDitError, match="pcsp_blocks \\[99\\]"):
        apply_safe_dit(model, SafeConfig("safe-core", pcsp_blocks=(99,)))
    from safe_dit import is_safe_dit_applied

    assert not is_safe_dit_applied(model) and not hasattr(model, "_safe_dit_handle")


def test_a_prompt_outside_the_world_is_warned_about(caplog):
    from safe_dit.commands.generate import warn_outside_world

    warn_outside_world("a red fox in the snow")
    warn_outside_world(PROMPT)
    assert len([r for r in caplog.records if "outside the embedded model's world" in r.message]) == 1
