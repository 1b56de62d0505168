"""The embedded video model's wiring: text states as WanPipeline computes them, the flow-matching convention,
loading a checkpoint into the stock WanPipeline and one generation, and bit-for-bit resumable training.

Checkpoints here are tiny and randomly initialised (one layer): wiring, not quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors.torch import load_file

from safe_dit.config import SafeDitError
from safe_dit.embedded import train_video, video_world, world
from safe_dit.embedded import video_model as vm

TINY = {"num_layers": 1}


@pytest.fixture(scope="module")
def text():
    from safe_dit.embedded.model import load_text_encoder

    return load_text_encoder()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("video-ckpt")
    model = vm.build_video_transformer(3, **TINY)
    train_video.save(model, out, {"steps": 0, "note": "random init"})
    return out, model


def test_every_caption_fits_the_text_tokens(text):
    tokenizer, _ = text
    n = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    phrases = [o.words() for c in world.COLORS for s in world.SHAPES
               for o in [video_world.VideoObj(c, s, m) for m in video_world.MOTION_OF.values()]
               + [video_world.VideoObj(c, s, video_world.STATIC, cell) for cell in world.POSITIONS]]
    longest = max(phrases, key=n)
    bg = max(world.BACKGROUNDS, key=lambda b: n(f" on a {b} background"))
    worst = f"{longest} and {longest} on a {bg} background"  # word pieces add up word by word
    assert len(tokenizer(worst).input_ids) <= vm.TEXT_TOKENS
    assert len(tokenizer(worst).input_ids) == 2 * n(longest) + n("and") + n(f"on a {bg} background") + 2


def test_text_states_are_the_pipelines(text):
    tokenizer, encoder = text
    pipe = vm.PixelWanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vm.PixelVideoVAE(),
                               scheduler=FlowMatchEulerDiscreteScheduler(),
                               transformer=vm.build_video_transformer(0, **TINY))
    prompt = "a red circle moving from the left to the right and a blue square at the center on a gray background"
    pos, neg = pipe.encode_prompt(prompt, "", True, max_sequence_length=vm.TEXT_TOKENS, device="cpu")
    ours = vm.encode_prompts(tokenizer, encoder, [prompt, ""])
    assert torch.equal(ours[0], pos[0]) and torch.equal(ours[1], neg[0])
    assert (ours[1, 2:] == 0).all() and (ours[1, :2] != 0).any()  # [CLS] [SEP], then zeros


def test_the_training_target_integrates_to_the_video_under_the_pipelines_scheduler():
    """An oracle that predicts what training regresses (noise - video, at x_t = (1 - s) video + s noise,
    timestep 1000 s) carries pure noise to the video through FlowMatchEulerDiscreteScheduler, as WanPipeline
    steps it; the opposite sign does not."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 2, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    finals = {}
    for sign in (1, -1):
        sched = FlowMatchEulerDiscreteScheduler(shift=vm.SCHEDULER_SHIFT)
        sched.set_timesteps(12)
        x = noise.clone()
        for t in sched.timesteps:
            s = (t / 1000.0).reshape(1)
            xt, target = train_video.flow_pair(x0, noise, s)
            if sign == 1:  # the sampler walks the training path: x is x_t, and the oracle is the target
                assert torch.allclose(x, xt, atol=1e-4)
                assert torch.allclose((x - x0) / s, target, atol=1e-3)
            x = sched.step(sign * target if sign == 1 else -(x - x0) / s, t, x, return_dict=False)[0]
        finals[sign] = x
    assert torch.allclose(finals[1], x0, atol=1e-4)
    assert (finals[-1] - x0).abs().mean() > 1.0


def test_a_checkpoint_loads_into_the_stock_wan_pipeline_and_generates_a_video(checkpoint):
    path, model = checkpoint
    pipe = vm.load_video_pipeline(path)
    assert isinstance(pipe, WanPipeline) and type(pipe).__call__ is not WanPipeline.__call__
    saved = load_file(path / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in saved.values())
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in saved.items())
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.text_dim == vm.TEXT_DIM
    out = pipe("a blue square moving from the top to the bottom on a black background", num_inference_steps=2,
               guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np")
    (video,) = vm.frames_uint8(out)
    assert video.shape == (video_world.NUM_FRAMES, video_world.FRAME_SIZE, video_world.FRAME_SIZE, 3)
    assert video.dtype == np.uint8 and video.std() > 0
    longer = pipe("a red circle at the center on a white background", num_frames=12, num_inference_steps=1,
                  guidance_scale=1.0, output_type="np")
    assert longer.frames.shape[1] == 12
    assert vm.video_weights_identity(path)["steps"] == 0


def test_a_missing_checkpoint_is_refused_in_one_line(tmp_path):
    with pytest.raises(SafeDitError, match="no trained video transformer") as err:
        vm.load_video_pipeline(tmp_path)
    assert "\n" not in str(err.value) and "train_video_model.py" in str(err.value)


def tiny_argv(out) -> list[str]:
    return ["--steps", "4", "--batch", "1", "--frames", "2", "--save-every", "2", "--log-every", "1",
            "--threads", "1", "--seed", "5", "--config-overrides", json.dumps(TINY), "--resume", "--quiet",
            "--out", str(out)]


def test_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_video.main(tiny_argv(straight)) == 0
    calls = {"n": 0}
    real = video_world.sample_scene

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # batch 1: the third step's scene; the step-2 checkpoint is saved
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(video_world, "sample_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_video.main(tiny_argv(resumed))
    assert json.loads((resumed / "training.json").read_text())["steps"] == 2
    monkeypatch.setattr(video_world, "sample_scene", real)
    assert train_video.main(tiny_argv(resumed)) == 0
    a = load_file(straight / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((straight / "training.json").read_text())
    lb = json.loads((resumed / "training.json").read_text())
    assert [e["loss"] for e in la["log"]] == [e["loss"] for e in lb["log"]] and lb["steps"] == 4
    assert lb["tokens_per_video"] == 2 * 16 * 16 and lb["command"].startswith("python scripts/train_video_model.py")
    with pytest.raises(SystemExit, match="another command"):
        train_video.main(tiny_argv(resumed)[2:] + ["--steps", "6"])


def test_the_eval_helper_grades_every_prompt_of_a_seeded_set(checkpoint, tmp_path):
    from safe_dit.embedded import video_eval

    out = tmp_path / "eval.json"
    assert video_eval.main(["--model", str(checkpoint[0]), "--single", "1", "--two", "1", "--steps", "1",
                            "--seed", str(video_eval.HELD_OUT_SEED), "--json", str(out), "--record",
                            "--strip", str(tmp_path / "strip.png")]) == 0
    result = json.loads(out.read_text())
    from PIL import Image

    picture = np.asarray(Image.open(tmp_path / "strip.png").convert("RGB"))
    frames, size = video_world.NUM_FRAMES, video_world.FRAME_SIZE
    assert picture.shape == (2 * 2 * size * 3, frames * size * 3, 3)  # 2 prompts x (generated, world), 3x
    truth = video_world.render(video_world.prompt_set(1, 1, video_eval.HELD_OUT_SEED)[0], None)
    assert (picture[size * 3:size * 6:3, ::3] == np.concatenate(list(truth), axis=1)).all()
    assert [p["prompt"] for p in result["per_prompt"]] == [
        video_world.caption(s) for s in video_world.prompt_set(1, 1, video_eval.HELD_OUT_SEED)]
    assert set(result["accuracy"]) == {*video_eval.video_grader.ATTRIBUTES, "all"}
    assert result["accuracy"]["all"] == 0.0  # a random one-layer model draws no moving shapes
    card = json.loads((checkpoint[0] / "training.json").read_text())
    assert card["evaluations"][f"held-out (seed {video_eval.HELD_OUT_SEED})"]["prompts"] == 2
    assert len({video_eval.EVAL_SEED, video_eval.HELD_OUT_SEED, video_eval.SELECTION_SEED, 0}) == 4


def test_training_can_continue_from_a_checkpoint_and_keeps_its_history(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "more"
    argv = [a for a in tiny_argv(out) if a != "--resume"]
    argv[argv.index("--steps") + 1] = "1"
    assert train_video.main(argv + ["--init-from", str(path)]) == 0
    card = json.loads((out / "training.json").read_text())
    assert card["steps"] == 1 and card["continues"]["steps"] == 0
