"""safe-dit generate on a video model (the offline tiny Wan pipeline): the animated WebP decoded back to the asked
frame count and size, the sensitivity strip (one panel per latent frame), the summary, atomic writes, refusals."""

import json

import numpy as np
import pytest

from safe_dit.bench import video as video_files
from safe_dit.cli import main

PROMPT = "a red circle at the top left"


def _gen(tmp_path, *extra, frames="5", height="48", width="64"):
    out = tmp_path / "clip.webp"
    code = main(["generate", PROMPT, "--model", "tiny-random-wan", "--height", height, "--width", width,
                 "--frames", frames, "--steps", "4", "--out", str(out), *extra])
    return code, out


@pytest.mark.parametrize("mode", ["safe-core", "dense-fp"])
def test_video_decodes_to_the_asked_frames_and_size(tmp_path, capsys, monkeypatch, mode):
    made = []  # the pipeline's frames, as generate hands them to the writer

    def recording(frames):
        made.append(np.asarray(frames))
        return video_frames(frames)

    video_frames = video_files.video_frames
    monkeypatch.setattr(video_files, "video_frames", recording)
    code, out = _gen(tmp_path, "--mode", mode, "--fps", "12")
    assert code == 0, capsys.readouterr().err
    summary = json.loads(out.with_suffix(".json").read_text())
    assert (summary["frames"], summary["height"], summary["width"], summary["fps"]) == (5, 48, 64, 12.0)
    assert summary["mode"] == mode and summary["backbone"] == "wan" and summary["format"] == "animated WebP"
    decoded = video_files.read_video(out, summary["fps"])
    assert len(decoded) == 5 and {f.size for f in decoded} == {(64, 48)}  # PIL sizes are (width, height)
    source = made[0]
    assert source.shape == (5, 48, 64, 3)  # WanPipeline's np frames of the one video
    error = np.abs(np.stack([np.asarray(f) for f in decoded]) / 255.0 - source).mean()
    assert error < 0.03, error  # the frames themselves, not just their count (lossy WebP at quality 90)
    strip = tmp_path / "clip.sensitivity.png"
    names = sorted(p.name for p in tmp_path.iterdir())
    if mode == "safe-core":
        from PIL import Image

        frames_lat, rows, cols = summary["token_grid"]
        assert (frames_lat, rows, cols) == (2, 3, 4)  # 1 + (5 - 1) / 4 latent frames, 48/16 x 64/16 tokens
        assert summary["tokens_per_step"][0] == 2 * 3 * 4 and 0 < summary["flop_ratio_vs_dense"] < 1
        with Image.open(strip) as im:
            assert im.size == (64 * frames_lat, 48)  # one 64x48 panel per latent frame, side by side
            panels = np.asarray(im.convert("RGB")).reshape(48, frames_lat, 64, 3)
        assert not np.array_equal(panels[:, 0], panels[:, 1])  # each panel its own frame's map and video frame
        assert names == ["clip.json", "clip.sensitivity.png", "clip.webp"]  # and no temporary file
        assert list(summary["files"]) == ["video", "sensitivity_strip", "summary"]
    else:
        assert summary["flop_ratio_vs_dense"] == 1.0 and summary["token_grid"] is None
        assert names == ["clip.json", "clip.webp"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"wrote {out}  ({mode}, 5 frames of 48x64 at 12 fps, 4 steps")
    assert len(lines) == len(summary["files"])  # one human line per file


def test_default_size_and_frames_and_json_on_stdout(tmp_path, capsys):
    out = tmp_path / "clip.webp"
    code = main(["generate", PROMPT, "--model", "tiny-random-wan", "--steps", "2", "--mode", "dense-fp",
                 "--out", str(out), "--json", "-"])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is the JSON alone
    from safe_dit.testing.wan import KIT

    run = KIT.tiny_run
    assert (summary["frames"], summary["height"], summary["width"]) == (run.frames, run.height, run.width)
    decoded = video_files.read_video(out, summary["fps"])
    assert len(decoded) == run.frames and decoded[0].size == (run.width, run.height)
    assert captured.err.count("wrote ") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["clip.webp"]


def test_an_interrupted_video_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_files, "save_video", boom)
    assert _gen(tmp_path)[0] == 130  # Ctrl-C while writing: one line, exit 130
    assert list(tmp_path.iterdir()) == []  # no video, no strip, no JSON, no temporary file


def test_a_still_video_reads_back_every_frame(tmp_path):
    frames = np.zeros((9, 16, 32, 3), np.float32)
    frames[6:] = 0.5  # six identical frames, then three: WebP stores them as two frames with longer durations
    path = tmp_path / "still.webp"
    video_files.write_video(frames, path, fps=16)
    from PIL import Image

    with Image.open(path) as im:
        assert im.n_frames < 9  # the encoder merged them
    decoded = video_files.read_video(path, fps=16)
    assert len(decoded) == 9 and decoded[0].size == (32, 16)
    assert [int(np.asarray(f).mean().round()) for f in decoded] == [0] * 6 + [128] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["still.webp"]


@pytest.mark.parametrize("fps", [16, 24, 7.5, 30])
def test_durations_keep_the_frame_rate(fps):
    durations = video_files._durations(81, fps)
    assert all(abs(sum(durations[:i]) - i * 1000 / fps) <= 0.5 for i in range(82))


@pytest.mark.parametrize("model", ["tiny-random-hunyuan-video", "tiny-random-hunyuan-video-1.5"])
def test_video_kits_without_a_text_pipeline_are_refused(tmp_path, capsys, model):
    code = main(["generate", PROMPT, "--model", model, "--out", str(tmp_path / "x.webp")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err  # one line
    assert "no offline tiny pipeline that takes a text prompt" in err and "tiny-random-wan" in err  # what works
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model,extra,match", [
    ("tiny-random-wan", ["--frames", "6"], "--frames must be 1 + 4 x k"),
    ("tiny-random-wan", ["--out", "{tmp}/clip.png"], "must end in .webp for a video model"),
    ("tiny-random-wan", ["--fps", "0"], "--fps must be in"),
    ("tiny-random-wan", ["--frames", "201", "--height", "48", "--width", "64"], "RoPE table covers 32 tokens"),
    ("tiny-random", ["--frames", "9"], "--frames is for video models"),
])
def test_bad_video_arguments(tmp_path, capsys, model, extra, match):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "clip.webp")]
    code = main(["generate", PROMPT, "--model", model, "--steps", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_video_models(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "video backbone: Wan, HunyuanVideo or HunyuanVideo 1.5" in text
    assert "video: tiny-random-wan" in text and "tiny-random-hunyuan-video," not in text
    assert "A video model writes an animated WebP" in text


def test_the_catalog_knows_the_video_kits_as_the_kits_do():
    from safe_dit.testing import catalog
    from safe_dit.testing.kits import KITS

    declared = {d.name: (d.video, d.text_prompts) for d in catalog.declared_kits()}
    assert declared == {k.name: (k.frame_kwargs is not None, k.text_prompts) for k in KITS.values()}
    assert declared["wan"] == (True, True) and declared["pixart"] == (False, True)


def test_a_terminal_shows_the_sampling_progress(tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code, _ = _gen(tmp_path)
    assert code == 0
    assert "4/4" in terminal.getvalue()  # the pipeline's own bar over the 4 steps (off when stderr is no terminal)


def test_a_video_pipeline_directory_writes_a_video(tmp_path, capsys, monkeypatch):
    from safe_dit.commands import generate
    from safe_dit.testing.wan import build_wan_text_pipeline

    (tmp_path / "wan").mkdir()  # a local pipeline directory: a video model is known only once it is loaded
    monkeypatch.setattr(generate, "load_pipeline", lambda *args: build_wan_text_pipeline())
    model = ["generate", PROMPT, "--model", str(tmp_path / "wan"), "--steps", "4"]
    code = main([*model, "--out", str(tmp_path / "clip.webp")])  # WanPipeline's defaults: 81 frames of 480x832
    assert code == 2 and "21 x 30 x 52 (frames x rows x columns)" in capsys.readouterr().err  # past tiny RoPE
    sized = [*model, "--height", "32", "--width", "48", "--frames", "9"]
    code = main([*sized, "--out", str(tmp_path / "clip.png")])
    assert code == 2 and "must end in .webp for a video model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "wan"]
    out = tmp_path / "clip.webp"
    code = main([*sized, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["backbone"] == "wan" and summary["token_grid"] == [3, 2, 3]
    decoded = video_files.read_video(out, summary["fps"])
    assert len(decoded) == summary["frames"] == 9 and decoded[0].size == (48, 32)


def test_a_pipeline_whose_guider_holds_the_scale_gets_no_guidance_keyword():
    from argparse import Namespace

    from safe_dit.bench.pipelines import call_kwargs, is_video
    from safe_dit.config import SafeDitError
    from safe_dit.testing.hunyuan_video15 import build_hunyuan_video15_pipeline

    pipe = build_hunyuan_video15_pipeline()  # HunyuanVideo15Pipeline: CFG through its guider component
    held = pipe.guider.guidance_scale
    args = Namespace(height=16, width=24, steps=2, guidance=held, seed=0, negative_prompt="")
    assert is_video(pipe) and "guidance_scale" not in call_kwargs(pipe, args)
    with pytest.raises(SafeDitError, match="from its guider component"):
        call_kwargs(pipe, Namespace(**{**vars(args), "guidance": held + 1}))  # never silently another scale


def test_a_video_pipeline_without_a_default_size_asks_for_one(tmp_path, capsys, monkeypatch):
    from safe_dit.commands import generate
    from safe_dit.testing.hunyuan_video15 import build_hunyuan_video15_pipeline

    (tmp_path / "hv15").mkdir()
    monkeypatch.setattr(generate, "load_pipeline", lambda *args: build_hunyuan_video15_pipeline())
    code = main(["generate", PROMPT, "--model", str(tmp_path / "hv15"), "--out", str(tmp_path / "clip.webp")])
    err = capsys.readouterr().err
    assert code == 2 and "HunyuanVideo15Pipeline has no default height or width: pass --height and --width" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "hv15"]
