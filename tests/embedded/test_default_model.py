"""The embedded default model's machinery: text encoder (offline, hash-checked, states exactly as
the pipeline computes them), the training script end to end on a micro config, the pixel-space
pipeline under every mode, and the shapes world's captions."""

import json
import random

import numpy as np
import pytest
import torch

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.config import SafeDitError
from safe_dit.embedded import model as dm
from safe_dit.embedded import world
from safe_dit.embedded.train import CaptionCache
from safe_dit.embedded.train import main as train_main

MICRO = json.dumps(dict(hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=2))


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    assert train_main(["--steps", "3", "--batch", "4", "--log-every", "1", "--save-every", "2", "--quiet",
                       "--config-overrides", MICRO, "--out", str(out)]) == 0
    return out


def test_text_encoder_hash_is_checked(monkeypatch):
    monkeypatch.setattr(dm, "TEXT_ENCODER_SHA256", "0" * 64)
    with pytest.raises(SafeDitError, match="sha256"):
        dm.load_text_encoder()


def test_training_writes_a_loadable_fp16_checkpoint_and_log(micro_model_dir):
    record = json.loads((micro_model_dir / "training.json").read_text())
    assert record["steps"] == 3 and [e["step"] for e in record["log"]] == [1, 2, 3]
    assert all(np.isfinite(e["loss"]) for e in record["log"])
    from safetensors import safe_open

    with safe_open(micro_model_dir / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    pipe = dm.load_default_pipeline(micro_model_dir)
    assert pipe.transformer.config.hidden_size == 32 and pipe.transformer.dtype == torch.float32


def test_caption_cache_matches_the_pipelines_own_text_states(micro_model_dir):
    pipe = dm.load_default_pipeline(micro_model_dir)
    prompt = "a red circle at the top left and a blue square at the center on a gray background"
    pe, pm, ne, nm = pipe.encode_prompt(prompt, True, device="cpu", clean_caption=False)
    states, mask = CaptionCache(pipe.tokenizer, pipe.text_encoder)([prompt, ""])
    n = int(pm.sum())
    assert torch.equal(mask[0], pm[0]) and int(mask[1].sum()) == int(nm.sum()) == 2
    torch.testing.assert_close(states[0, :n], pe[0, :n], rtol=0, atol=0)
    torch.testing.assert_close(states[1, :2], ne[0, :2], rtol=0, atol=0)


def test_pixel_pipeline_runs_every_mode_at_native_and_other_sizes(micro_model_dir):
    pipe = dm.load_default_pipeline(micro_model_dir)
    pipe.set_progress_bar_config(disable=True)
    outs = {}
    for mode in ("dense", "dense-fp", "safe-core", "safe-sw"):
        apply_safe_dit(pipe, SafeConfig(mode))
        for h, w in ((64, 64), (48, 80)):
            img = pipe("a red circle at the top left on a gray background", height=h, width=w, num_inference_steps=8,
                       clean_caption=False, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
            assert img.shape == (h, w, 3) and np.isfinite(img).all()
            outs[mode, h] = img
        remove_safe_dit(pipe)
    np.testing.assert_allclose(outs["dense-fp", 64], outs["dense", 64], atol=1e-5)


def test_captions_round_trip_and_renders_are_deterministic():
    rng = random.Random(0)
    for _ in range(200):
        scene = world.sample_scene(rng)
        assert world.parse_caption(world.caption(scene)) == scene
    two = world.Scene("gray", (world.Obj("red", "circle", (2, 2)), world.Obj("blue", "square", (0, 1))))
    assert world.caption(two) == ("a blue square at the top center and a red circle at the bottom right "
                                   "on a gray background")  # objects listed in reading order
    scene = world.sample_scene(random.Random(1), two_object_prob=1.0)
    assert np.array_equal(world.render(scene, random.Random(3)), world.render(scene, random.Random(3)))
    with pytest.raises(ValueError, match="colour"):
        world.Obj("mauve", "circle", (0, 0))
    with pytest.raises(ValueError, match="share"):
        world.Scene("white", (world.Obj("red", "circle", (0, 0)), world.Obj("blue", "square", (0, 0))))
    with pytest.raises(ValueError, match="not a shapes caption"):
        world.parse_caption("a photo of a cat")


def test_missing_weights_get_a_clear_error(tmp_path):
    with pytest.raises(SafeDitError, match="no trained transformer"):
        dm.load_default_pipeline(tmp_path)


def test_training_can_continue_from_a_checkpoint(micro_model_dir, tmp_path):
    out = tmp_path / "continued"
    assert train_main(["--steps", "1", "--batch", "2", "--quiet", "--config-overrides", MICRO,
                       "--init-from", str(micro_model_dir), "--out", str(out)]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["continues"]["steps"] == 3 and record["steps"] == 1


def _weights(out):
    from safetensors.torch import load_file
    return load_file(str(out / "diffusion_pytorch_model.safetensors"))


def test_an_interrupted_resumable_run_continues_bit_for_bit(tmp_path, monkeypatch):
    from safe_dit.embedded import train as tr

    args = ["--steps", "4", "--batch", "2", "--quiet", "--log-every", "1", "--save-every", "2", "--resume",
            "--config-overrides", MICRO]
    assert train_main(args + ["--out", str(tmp_path / "straight")]) == 0
    assert not (tmp_path / "straight" / tr.RESUME_FILE).exists()  # a finished run leaves only the checkpoint

    calls, real = [0], world.sample_scene

    def dies_in_step_three(*a, **k):
        calls[0] += 1
        if calls[0] > 2 * 2:  # batch 2: scenes of steps 1-2 drawn, the run stops inside step 3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr.world, "sample_scene", dies_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        train_main(args + ["--out", str(tmp_path / "resumed")])
    assert (tmp_path / "resumed" / tr.RESUME_FILE).is_file()
    monkeypatch.setattr(tr.world, "sample_scene", real)
    assert train_main(args + ["--out", str(tmp_path / "resumed")]) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = json.loads((tmp_path / "straight" / "training.json").read_text())["log"]
    log_b = json.loads((tmp_path / "resumed" / "training.json").read_text())["log"]
    assert [e["loss"] for e in log_a] == [e["loss"] for e in log_b] and len(log_a) == 4


def test_resume_refuses_a_state_saved_by_another_command(tmp_path):
    base = ["--batch", "2", "--quiet", "--save-every", "1", "--resume", "--config-overrides", MICRO,
            "--out", str(tmp_path)]
    (tmp_path / "resume.pt").parent.mkdir(exist_ok=True)
    import torch as _t
    _t.save(dict(argv=["--steps", "9"]), tmp_path / "resume.pt")
    with pytest.raises(SystemExit, match="another command"):
        train_main(["--steps", "2"] + base)


def test_training_through_the_fast_path_has_stock_losses(tmp_path):
    """The training script runs the model under dense-fp (mask elided, caption padding split by length):
    the same losses as through stock masked attention, step by step (the weights move the same way)."""
    args = ["--steps", "3", "--batch", "4", "--quiet", "--log-every", "1", "--caption-dropout", "0.5",
            "--config-overrides", MICRO]
    assert train_main(args + ["--out", str(tmp_path / "fp")]) == 0
    assert train_main(args + ["--no-fast-path", "--out", str(tmp_path / "stock")]) == 0
    fp = json.loads((tmp_path / "fp" / "training.json").read_text())
    stock = json.loads((tmp_path / "stock" / "training.json").read_text())
    assert fp["fast_path"] and not stock["fast_path"]
    np.testing.assert_allclose([e["loss"] for e in fp["log"]], [e["loss"] for e in stock["log"]], rtol=1e-5)
    a, b = _weights(tmp_path / "fp"), _weights(tmp_path / "stock")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 4e-6, worst  # the two fp16 checkpoints hold the same weights (measured: equal)


def test_training_at_128_pixels_is_a_1024_token_model(tmp_path):
    assert train_main(["--size", "128", "--steps", "1", "--batch", "2", "--quiet", "--config-overrides", MICRO,
                       "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["transformer_config"]["sample_size"] == 128 and record["data"].startswith("shapes world")
    assert "128x128" in record["data"]
    pipe = dm.load_default_pipeline(tmp_path)
    assert pipe.default_sample_size == 128 and pipe.default_image_size == 128 and record["rope_linear_factor"] == 1.0


def test_fine_tune_at_128_under_the_pipelines_resolution_extrapolation_matches_the_pipeline(tmp_path):
    """--rope-base 64: sample_size stays 64, the world is drawn at 128, and training conditions the model exactly as
    diffusers' LuminaPipeline does at 128x128 (positions interpolated by 2, attention base of 64): spied on."""
    from safe_dit.embedded.train import pipeline_conditioning
    assert train_main(["--size", "128", "--rope-base", "64", "--steps", "1", "--batch", "2", "--quiet",
                       "--config-overrides", MICRO, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["transformer_config"]["sample_size"] == 64 and record["image_size"] == 128
    assert record["rope_linear_factor"] == 2.0 and "128x128" in record["data"]
    pipe = dm.load_default_pipeline(tmp_path)
    assert pipe.default_sample_size == 128 and pipe.default_image_size == 64  # default height; the RoPE base
    seen = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: seen.append(k) or forward(*a, **k)
    with torch.no_grad():
        image = pipe("a red circle at the top left on a white background", num_inference_steps=1,
                     guidance_scale=1.0, output_type="np").images[0]
    assert image.shape == (128, 128, 3)
    rope, xattn, linear = pipeline_conditioning(pipe.transformer.config, 128)
    assert linear == 2.0 and seen and torch.equal(seen[0]["image_rotary_emb"], rope)
    assert seen[0]["cross_attention_kwargs"] == xattn
    rope_64, _, _ = pipeline_conditioning(pipe.transformer.config, 64)
    assert not torch.equal(rope, rope_64)  # the check can fail: 128 px is not conditioned as 64 px
