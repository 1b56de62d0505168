"""safe-dit generate on the offline tiny-random pipeline: files, summary, atomic writes, errors."""

import json
import math

import pytest

from safe_dit import SafeConfig
from safe_dit.cli import main


def _gen(tmp_path, *extra):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle at top left", "--model", "tiny-random", "--height", "64", "--width", "96",
                 "--steps", "6", "--out", str(out), *extra])
    return code, out


def test_safe_core_writes_image_overlay_and_summary(tmp_path, capsys):
    code, out = _gen(tmp_path)
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((tmp_path / "img.json").read_text())
    assert lines == [f"wrote {path}  ({what})" for path, what in zip(summary["files"].values(), (
        f"safe-core, 64x96, 6 steps, {summary['seconds']:.2f} s, {summary['flop_ratio_vs_dense']:.0%} of dense token "
        "work", "the prompt's sensitivity map over the image", "the JSON summary"))]  # one human line per file
    assert out.stat().st_size > 0
    assert (tmp_path / "img.sensitivity.png").stat().st_size > 0
    assert summary["mode"] == "safe-core" and summary["seconds"] > 0 and summary["peak_memory_mb"] > 0
    n = summary["tokens_per_step"][0]
    assert summary["step_kinds"][:2] == ["warmup", "warmup"]
    selective = [t for t, k in zip(summary["tokens_per_step"], summary["step_kinds"]) if k == "selective"]
    assert selective and all(t == math.ceil(n * SafeConfig().keep_ratio) for t in selective)  # the default keep ratio
    assert 0 < summary["flop_ratio_vs_dense"] < 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.json", "img.png", "img.sensitivity.png"]  # no temps


def test_json_dash_prints_the_summary_alone_on_stdout(tmp_path, capsys):
    code, out = _gen(tmp_path, "--json", "-")
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is the JSON and nothing else
    assert summary["mode"] == "safe-core" and "summary" not in summary["files"]
    assert captured.err.count("wrote ") == 2  # the image and its map, on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "img.sensitivity.png"]


def test_dense_fp_has_no_map_and_full_work(tmp_path, capsys):
    code, out = _gen(tmp_path, "--mode", "dense-fp")
    assert code == 0
    summary = json.loads((tmp_path / "img.json").read_text())
    assert summary["flop_ratio_vs_dense"] == 1.0 and summary["tokens_per_step"] is None
    assert "sensitivity_overlay" not in summary["files"]


def test_interrupted_save_leaves_no_image(tmp_path, monkeypatch):
    from PIL import Image

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    assert _gen(tmp_path)[0] == 130  # Ctrl-C: one line and exit 130, not a traceback
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,match", [
    (["--out", "x.gif"], "--out must end in"),
    (["--height", "50"], "multiples of 16"),
    (["--keep-ratio", "0"], "keep_ratio"),
])
def test_bad_arguments(tmp_path, capsys, extra, match):
    code, _ = _gen(tmp_path, *extra)
    assert code == 2 and match in capsys.readouterr().err


def test_unloadable_model_is_explained(tmp_path, capsys):
    (tmp_path / "nope").mkdir()  # a directory that holds no pipeline (a missing one is refused earlier)
    code = main(["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and "without downloading" in err and "tiny-random-flux" in err  # says what it takes


@pytest.mark.parametrize("model,backbone", [
    ("tiny-random-pixart", "pixart"), ("tiny-random-sd3", "sd3"), ("tiny-random-flux", "flux"),
])
def test_other_backbones_generate_with_their_map(tmp_path, capsys, model, backbone):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle at the top left", "--model", model, "--height", "64", "--width", "64",
                 "--steps", "6", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "img.json").read_text())
    assert summary["backbone"] == backbone and summary["mode"] == "safe-core"
    n = summary["tokens_per_step"][0]
    selective = [t for t, k in zip(summary["tokens_per_step"], summary["step_kinds"]) if k == "selective"]
    assert selective and all(t == math.ceil(n * SafeConfig().keep_ratio) for t in selective)
    assert 0 < summary["flop_ratio_vs_dense"] < 1
    assert (tmp_path / "img.sensitivity.png").stat().st_size > 0


def test_flux_refuses_a_negative_prompt_it_would_ignore(tmp_path, capsys):
    code = main(["generate", "a red circle", "--model", "tiny-random-flux", "--height", "64", "--width", "64",
                 "--steps", "2", "--negative-prompt", "blue", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "guidance-distilled" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_saved_pipeline_directory_loads_offline(tmp_path, capsys):
    from safe_dit.testing.kits import build_pixart_text_pipeline

    build_pixart_text_pipeline().save_pretrained(tmp_path / "pixart")
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle", "--model", str(tmp_path / "pixart"), "--mode", "dense-fp",
                 "--height", "64", "--width", "64", "--steps", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["backbone"] == "pixart"
    assert out.stat().st_size > 0



@pytest.fixture()
def micro_128(tmp_path, monkeypatch):
    """A 1-step micro model trained at 128 px, installed as the embedded 128-px model."""
    from safe_dit.embedded import model as dm
    from safe_dit.embedded.train import main as train_main

    out = tmp_path / "shapes-lumina-128"
    micro = json.dumps(dict(hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=2))
    assert train_main(["--size", "128", "--steps", "1", "--batch", "2", "--quiet", "--config-overrides", micro,
                       "--out", str(out)]) == 0
    monkeypatch.setitem(dm.EMBEDDED_MODELS, 128, out)
    return out


def test_128_pixels_pick_the_1024_token_embedded_model(tmp_path, capsys, micro_128):
    from PIL import Image

    from safe_dit.embedded.model import size_for

    assert size_for(128, 128) == 128 and size_for(None, None) == 64
    assert size_for(128, 64) == 64 and size_for(96, 96) == 64
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle at the center on a gray background", "--height", "128", "--width", "128",
                 "--steps", "3", "--out", str(out)]) == 0
    summary = json.loads((tmp_path / "img.json").read_text())
    assert Image.open(out).size == (128, 128) and (summary["height"], summary["width"]) == (128, 128)
    assert summary["tokens_per_step"][0] == 32 * 32  # patch 4 at 128 px: the 1024-token model ran
    capsys.readouterr()
    assert main(["eval", "--size", "128", "--single", "1", "--two", "0", "--steps", "2", "--modes", "dense-fp",
                 "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["settings"]["size"] == 128 and evaluated["settings"]["model"] == "embedded 128 px"


def test_a_missing_128_model_is_explained_before_any_work(tmp_path, capsys, monkeypatch):
    from safe_dit.embedded import model as dm

    monkeypatch.setitem(dm.EMBEDDED_MODELS, 128, tmp_path / "absent")
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle at the center on a gray background", "--height", "128", "--width", "128",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "128-px embedded model" in err and "--size 64" in err and not out.exists()
    assert main(["eval", "--size", "128", "--quick"]) == 2
    assert "still being trained" in capsys.readouterr().err
