"""Every subcommand's --help: fast and torch-free, every option explained, each default shown once and true."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import pytest

from safe_dit.commands import HelpFormatter, build_parser

CODE = ("import sys; from safe_dit.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)")


def _subparsers(parser, prefix=()):
    """(command words, parser) of every command and group, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def _leaves():
    return [words for words, sub in _subparsers(build_parser())
            if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)]


def test_building_every_parser_imports_neither_torch_nor_diffusers():
    code = ("import sys; from safe_dit.commands import build_parser; build_parser()\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


REFUSED = {"generate-bad-steps": ["generate", "x", "--steps", "0"], "eval-bad-mode": ["eval", "--modes", "fast"],
           "eval-no-prompts": ["eval", "--single", "0", "--two", "0"], "audit-bad-model": ["audit", "--model", "nope"],
           "pareto-bad-steps": ["pareto", "--steps", "0"], "midt-bad-lengths": ["midt", "--seq-lens", "0"],
           "forward-bad-layers": ["bench", "forward", "--layers", "0"],
           "e2e-bad-steps": ["bench", "e2e", "--steps", "0"]}
HELP = {"generate": ["generate", "--help"], "eval": ["eval", "--help"], "audit": ["audit", "--help"],
        "e2e": ["bench", "e2e", "--help"]}


@pytest.mark.parametrize("argv", [*HELP.values(), *REFUSED.values()], ids=[*HELP, *REFUSED])
def test_help_and_refusals_return_fast_and_load_no_torch(argv, tmp_path):
    """Under 1 s beyond the interpreter's own start-up (measured alongside, so a loaded machine does not fail it),
    and torch and diffusers never imported."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    baseline = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CODE, *argv], capture_output=True, text=True, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert run.stdout.strip().splitlines()[-1] == "False False", run.stderr[-2000:]
    assert seconds - baseline < 1.0, f"{argv}: {seconds:.2f} s (python -c pass: {baseline:.2f} s)"
    if "--help" not in argv:
        assert "error: " in run.stderr.strip().splitlines()[-1] and "Traceback" not in run.stderr  # one line


def test_every_command_is_walked():
    leaves = {" ".join(w) for w in _leaves()}
    assert {"generate", "eval", "pareto", "midt", "audit", "bench forward", "bench e2e", "study make",
            "study serve", "study report"} <= leaves


@pytest.mark.parametrize("words", _leaves(), ids=lambda w: " ".join(w))
def test_every_option_has_help_and_shows_its_true_default_once(words):
    parser = build_parser(list(words))
    for word in words:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    formatter = HelpFormatter(prog="x")
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{' '.join(words)} {name}: no help"
        text = formatter._expand_help(action) if action.help is not argparse.SUPPRESS else ""
        shown = re.findall(r"\(default:? ([^)]*)\)", text)
        assert len(shown) <= 1 and text.lower().count("(default") <= 1, f"{name}: a default shown twice: {text!r}"
        if shown:
            assert shown[0] == str(action.default), f"{name}: help says {shown[0]!r}, default {action.default!r}"
        if action.default is None:
            assert "(default" not in text.lower(), f"{name}: defaults to None but its help claims {text!r}"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            assert "(default" not in text.lower(), f"{name}: a switch's help shows its stored default: {text!r}"
