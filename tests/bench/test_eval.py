"""safe-dit eval: metrics against closed forms, the fixed prompt set, and the CLI contract
(run on a micro model trained for a few steps, so it checks plumbing, not quality)."""

import json
import math

import numpy as np
import pytest

from safe_dit.bench import quality
from safe_dit.cli import main
from safe_dit.embedded import world
from safe_dit.embedded.model import file_sha256


def test_psnr_and_ssim_closed_forms():
    a = np.full((32, 32, 3), 100, np.uint8)
    b = np.full((32, 32, 3), 110, np.uint8)
    assert quality.psnr(a, a) == math.inf and quality.ssim(a, a) == pytest.approx(1.0)
    assert quality.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    c1 = (0.01 * 255) ** 2  # flat images: SSIM = (2ab + c1) / (a^2 + b^2 + c1)
    assert quality.ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    scores = [quality.ssim(img, n) for n in noisy]
    assert scores == sorted(scores, reverse=True) and scores[0] < 1


def test_prompt_set_is_fixed_and_covers_the_vocabulary():
    a, b = quality.prompt_set(54, 30, seed=0), quality.prompt_set(54, 30, seed=0)
    assert a == b and len(a) == 84 and len(set(a)) == 84
    singles = a[:54]
    assert all(len(s.objects) == 1 for s in singles) and all(len(s.objects) == 2 for s in a[54:])
    assert {s.objects[0].color for s in singles} == set(world.COLORS)
    assert {s.objects[0].shape for s in singles} == set(world.SHAPES)
    assert {s.background for s in singles} == set(world.BACKGROUNDS)
    assert {s.objects[0].cell for s in singles} == set(world.POSITIONS)


@pytest.fixture(scope="module")
def micro_dir(micro_model):
    return micro_model(1)


def test_eval_cli_contract(micro_dir, tmp_path, capsys):
    grid, js = tmp_path / "grid.png", tmp_path / "eval.json"
    code = main(["eval", "--model", str(micro_dir), "--single", "2", "--two", "1", "--steps", "6",
                 "--no-progress", "--grid", str(grid), "--json", str(js)])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert json.loads(js.read_text()) == result and grid.stat().st_size > 0
    modes = result["modes"]
    assert list(modes) == ["dense", "dense-fp", "safe-core", "safe-sw"]
    weights = result["settings"]["weights"]  # which trained weights the numbers belong to
    assert weights["steps"] == 2 and weights["sha256"] == file_sha256(micro_dir
                                                                      / "diffusion_pytorch_model.safetensors")
    for m, e in modes.items():
        for key in ("accuracy", "psnr_vs_dense_fp", "ssim_vs_dense_fp", "seconds"):
            assert isinstance(e[key], float), (m, key)
        assert 0 <= e["accuracy"] <= 1 and set(e["attributes"]) == set(quality.ATTRIBUTES)
    assert modes["dense-fp"]["psnr_vs_dense_fp"] == 100.0 and modes["dense-fp"]["ssim_vs_dense_fp"] == pytest.approx(1)
    assert modes["dense"]["psnr_vs_dense_fp"] > 60  # exact fast path: same image up to float rounding
    assert modes["safe-core"]["token_fraction"] < 1 and modes["dense"]["token_fraction"] == 1
    assert len(result["rows"]) == 3 * 4 and {r["seed"] for r in result["rows"]} == {0, 1, 2}


def test_eval_refuses_bad_arguments(micro_dir, capsys):
    assert main(["eval", "--model", str(micro_dir), "--single", "0", "--two", "0"]) != 0
    assert "not both 0" in capsys.readouterr().err


def test_table_marks_missing_prompt_kinds(micro_dir, capsys):
    """A two-object-only prompt set (e.g. a held-out check of binding) has no one-object column value."""
    assert main(["eval", "--model", str(micro_dir), "--single", "0", "--two", "1", "--steps", "2",
                 "--modes", "dense-fp", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(ln for ln in out if ln.startswith("dense-fp"))
    assert row.split()[2] == "-" and "nan" not in row
    assert "accuracy_single_object" not in json.loads(out[-1])["modes"]["dense-fp"]
