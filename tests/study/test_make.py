"""`safe-dit study make`: paired images of two settings on the same prompts and seeds, and their manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_args
from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.study import make
from safe_dit.study.store import Study


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_the_manifest_records_both_settings_seeds_and_each_image_hash(study_dir):
    m = manifest(study_dir)
    assert m["a"]["config"] == dataclasses.asdict(SafeConfig("dense-fp"))
    assert m["b"]["config"] == dataclasses.asdict(SafeConfig("safe-core"))  # the default safe-core, in full
    assert (m["a"]["steps"], m["b"]["steps"]) == (4, 4)
    assert [p["seed"] for p in m["pairs"]] == [5 + i for i in range(6)]
    assert sum(" and " in p["prompt"] for p in m["pairs"]) == 3  # 3 one-object + 3 two-object scenes
    names = [p[k]["image"] for p in m["pairs"] for k in "ab"]
    assert len(set(names)) == 12 and sorted(f.name for f in (study_dir / "images").iterdir()) == sorted(names)
    for name in names:
        digest = hashlib.sha256((study_dir / "images" / name).read_bytes()).hexdigest()
        assert m["sha256"][f"images/{name}"] == digest
        assert not digest.startswith(name.removesuffix(".png"))  # random names: not even the content tells
    Study(study_dir)  # the server's own check of every hash passes


def test_each_side_is_the_image_eval_draws_with_that_setting_and_seed(study_dir, embedded_pipe):
    """Same prompt, same seed, same setting: pixel for pixel the image of `safe-dit eval`'s generator (another
    code path than the study's, which calls the pipeline as `safe-dit generate` does), on both sides."""
    from safe_dit.api import apply_safe_dit, remove_safe_dit
    from safe_dit.bench.quality import generate

    pair = manifest(study_dir)["pairs"][3]
    for side, mode in (("a", "dense-fp"), ("b", "safe-core")):
        apply_safe_dit(embedded_pipe, SafeConfig(mode))
        try:
            img, _ = generate(embedded_pipe, pair["prompt"], pair["seed"], 4, 4.0)
        finally:
            remove_safe_dit(embedded_pipe)
        stored = np.asarray(Image.open(study_dir / "images" / pair[side]["image"]).convert("RGB"))
        np.testing.assert_array_equal(stored, img)


@pytest.mark.parametrize("spec, name, steps, family", [
    ("dense-fp", "dense-fp", 30, "safe-dit"),
    ("safe-core@12", "safe-core", 12, "safe-dit"),
    ("steps x0.50", "steps x0.50", 15, "steps"),
    ("mag-cache(threshold=0.12)", "mag-cache(threshold=0.12)", 30, "peer"),
    ("safe-core:keep_ratio=0.5,anchor_interval=3@20", "safe-core:keep_ratio=0.5,anchor_interval=3", 20, "safe-dit"),
])
def test_settings_name_modes_pareto_points_peers_and_step_counts(spec, name, steps, family):
    side = make.parse_side(spec, 30)
    assert (side.setting.name, side.steps, side.setting.family) == (name, steps, family)
    if ":" in spec:
        assert (side.setting.safe.keep_ratio, side.setting.safe.anchor_interval) == (0.5, 3)
    if family == "peer":
        assert side.setting.peer.params == {"threshold": 0.12} and side.setting.safe.mode == "dense-fp"


@pytest.mark.parametrize("spec, message", [
    ("turbo", "unknown setting 'turbo'"),
    ("safe-core@0", "step count >= 1"),
    ("safe-core@x", "step count >= 1"),
    ("safe-core:keep=0.5", "not FIELD=VALUE"),
    ("safe-core:mode=dense", "not FIELD=VALUE"),
    ("safe-core:keep_ratio=lots", "expected a float"),
    ("safe-core:srsu=maybe", "expected true or false"),
    ("safe-core:keep_ratio=2", "keep_ratio must be in (0, 1]"),
])
def test_bad_settings_are_one_line_errors(spec, message):
    with pytest.raises(SafeDitError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make.parse_side(spec, 30)


def test_refusals_come_before_any_work_and_leave_nothing(cli, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    cases = [
        (["--b", "safe-core", "--out", str(tmp_path / "s")], "--a, --b and --out are required"),
        (["--a", "dense-fp", "--b", "warp", "--out", str(tmp_path / "s")], "unknown setting 'warp'"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(a_file)], "is a file"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(full)], "not empty and holds no study"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(a_file / "s")], "is a file, not a folder"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(tmp_path / "s"), "--prompts", str(tmp_path / "no")],
         "no such file"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(tmp_path / "s"), "--prompts", str(empty)],
         "holds no prompt"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(tmp_path / "s"), "--steps", "0"],
         "--steps must be >= 1"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(tmp_path / "s"), "--height", "50"], "multiples of 16"),
        (["--a", "dense-fp", "--b", "safe-core", "--out", str(tmp_path / "s"), "--single", "0", "--two", "0"],
         "not both 0"),
    ]
    for argv, message in cases:
        code, out, err = cli("study", "make", *argv)
        assert (code == 2 and err.count("\n") == 1 and err.startswith("safe-dit: error:")
                and message in err), (argv, err)
    assert not (tmp_path / "s").exists() and sorted(p.name for p in full.iterdir()) == ["notes.txt"]


def test_a_study_with_votes_is_never_overwritten(study_dir, tmp_path, cli):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    code, _, err = cli("study", "make", "--a", "dense-fp", "--b", "safe-core", "--out", str(copy))
    assert code == 2 and "--overwrite replaces it" in err
    (copy / "votes.sqlite").write_bytes(b"")
    code, _, err = cli("study", "make", "--a", "dense-fp", "--b", "safe-core", "--out", str(copy), "--overwrite")
    assert code == 2 and "holds votes" in err
    assert manifest(copy) == manifest(study_dir)


def test_prompts_from_a_file_peers_and_step_counts(embedded_pipe, tmp_path, capsys):
    """A prompt file, a peer cache against a step reduction, then --overwrite replacing the study whole."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle at the center on a white background\n\n"
                       "a blue square at the top left on a black background\n")
    out = tmp_path / "peers"
    args = make_args("--a", "taylorseer(cache_interval=2)@3", "--b", "dense-fp@2", "--prompts", str(prompts),
                     "--seed", "7", "--out", str(out), "--no-progress")
    assert make.run(args, pipe=embedded_pipe, weights={"path": "embedded default"}) == 0
    m = manifest(out)
    assert [p["prompt"] for p in m["pairs"]] == ["a red circle at the center on a white background",
                                                  "a blue square at the top left on a black background"]
    assert [p["seed"] for p in m["pairs"]] == [7, 8]
    assert (m["a"]["peer"], m["a"]["peer_params"], m["a"]["steps"], m["b"]["steps"]) == ("taylorseer",
                                                                                       {"cache_interval": 2}, 3, 2)
    assert m["prompts"]["kind"] == "file" and len(m["prompts"]["sha256"]) == 64
    first = {f.name for f in (out / "images").iterdir()}
    prompts.write_text("a green triangle at the center on a gray background\n")
    args = make_args("--a", "dense-fp@1", "--b", "dense@1", "--prompts", str(prompts), "--out", str(out),
                     "--overwrite", "--no-progress")
    assert make.run(args, pipe=embedded_pipe, weights={"path": "embedded default"}) == 0
    now = {f.name for f in (out / "images").iterdir()}
    assert len(now) == 2 and not now & first  # the replaced study's images are gone
    assert manifest(out)["pairs"][0]["psnr_b_vs_a"] > 40  # dense and dense-fp: the same image within rounding
    capsys.readouterr()


def test_the_study_commands_teach_in_their_help(capsys):
    from safe_dit.cli import main

    for argv, words in ((["--help"], ["safe-dit study make", "safe-dit study report"]),
                        (["study", "--help"], ["safe-dit study serve studies/mine"]),
                        (["study", "make", "--help"], ["NAME[:FIELD=VALUE,...][@STEPS]", "--list"]),
                        (["study", "serve", "--help"], ["WAL mode", "127.0.0.1"]),
                        (["study", "report", "--help"], ["H0: win rate <= 0.5 - M", "--margin"])):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        text = capsys.readouterr().out
        assert stop.value.code == 0 and all(w in text for w in words), (argv, text[:300])


def test_list_names_every_setting_and_each_parses(cli):
    code, out, _ = cli("study", "make", "--list")
    names = [line.split("  ")[0].strip() for line in out.splitlines()]
    assert code == 0 and {"dense-fp", "safe-core", "steps x0.50", "mag-cache(threshold=0.12)"} <= set(names)
    for name in names:
        assert make.parse_side(name, 30).setting.name == name
