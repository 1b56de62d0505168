"""Train the embedded video model (``safe_dit.embedded.video_model``) on the moving-shapes world.

Rectified flow in the convention of diffusers' FlowMatchEulerDiscreteScheduler (what the pipeline samples
with): sigma ~ logit-normal, x_t = (1 - sigma) * video + sigma * noise, timestep = 1000 * sigma, the
transformer regresses noise - video. Text states are WanPipeline's (:func:`video_model.encode_prompts`);
captions are replaced by "" (the pipeline's negative prompt) with probability ``--caption-dropout`` so that
classifier-free guidance works. An EMA of the weights is what gets saved (fp16 safetensors + config.json +
training.json); with ``--resume`` the full state (fp32 weights, optimiser, RNGs) is saved beside it and an
interrupted run continues bit for bit when the same command is run again.

    python scripts/train_video_model.py --steps 4000 --threads 1 --resume --out /work/ckpt-video
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from safe_dit.embedded import video_world
from safe_dit.embedded.model import load_text_encoder
from safe_dit.embedded.train import lr_at, optimise, run_command
from safe_dit.embedded.video_model import TEXT_TOKENS, VIDEO_WEIGHTS_DIR, build_video_transformer, encode_prompts
from safe_dit.inspection.environment import environment

RESUME_FILE = "resume.pt"
SAFETENSORS = "diffusion_pytorch_model.safetensors"


class VideoCaptionCache:
    """WanPipeline text states per caption, computed once (the caption space is finite)."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.encoder, self.cache = tokenizer, encoder, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            for c, s in zip(missing, encode_prompts(self.tokenizer, self.encoder, missing)):
                self.cache[c] = s.clone()
        return torch.stack([self.cache[c] for c in captions])


def batch_videos(scenes, rng: random.Random, frames: int, size: int) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1], the layout WanPipeline's latents have."""
    vids = np.stack([video_world.render(s, rng, frames, size) for s in scenes])  # [B, F, H, W, 3] uint8
    return torch.from_numpy(vids).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def flow_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of FlowMatchEulerDiscreteScheduler's convention: its step is x + (sigma_next - sigma) * v,
    so the velocity v the model predicts is noise - x0."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def save(model, out: Path, record: dict) -> None:
    """``model``'s weights as fp16 safetensors + config.json (what ``from_pretrained`` reads) + training.json;
    written beside each other and moved into place, so a reader never sees half a checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / (SAFETENSORS + ".tmp"), metadata={"format": "pt"})
    model.save_config(out)
    (out / "training.json.tmp").write_text(json.dumps(record, indent=2) + "\n")
    (out / (SAFETENSORS + ".tmp")).replace(out / SAFETENSORS)
    (out / "training.json.tmp").replace(out / "training.json")


def train(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer, encoder = load_text_encoder()
    captions = VideoCaptionCache(tokenizer, encoder)
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    model = build_video_transformer(args.seed, **overrides).train()
    previous = {}
    if args.init_from:  # continue from a saved (EMA, fp16) checkpoint; the optimiser starts afresh
        from diffusers import WanTransformer3DModel

        start = WanTransformer3DModel.from_pretrained(args.init_from, dtype=torch.float32)
        model.load_state_dict(start.state_dict())
        card = Path(args.init_from) / "training.json"
        previous = json.loads(card.read_text()) if card.is_file() else {}
    ema = build_video_transformer(args.seed, **overrides).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    frames, size = args.frames, args.size
    p_t, p_h, p_w = model.config.patch_size
    tokens = (frames // p_t) * (size // p_h) * (size // p_w)
    record = dict(
        data=f"moving-shapes world (safe_dit.embedded.video_world): {frames} frames of {size}x{size}, 1-2 objects, "
             f"{len(video_world.world.COLORS)} colours x {len(video_world.world.SHAPES)} shapes, "
             f"{len(video_world.MOTIONS) - 1} directions or still in one of {len(video_world.world.POSITIONS)} cells, "
             f"{len(video_world.world.BACKGROUNDS)} backgrounds, two-object probability {args.two_object_prob}, "
             f"still-object probability {args.static_prob}",
        command="python scripts/train_video_model.py " + " ".join(args.argv),
        frames=frames, frame_size=size, tokens_per_video=tokens, text_tokens=TEXT_TOKENS,
        transformer_config=dict(model.config), parameters=n_params, text_encoder="all-MiniLM-L6-v2",
        objective="rectified flow, FlowMatchEulerDiscreteScheduler convention: x_t = (1 - s) x0 + s noise, "
                  "timestep 1000 s, target noise - x0, s logit-normal",
        seed=args.seed, batch=args.batch, lr=args.lr, warmup=args.warmup, ema=args.ema,
        caption_dropout=args.caption_dropout, environment=environment("cpu"), log=[],
    )
    if previous:  # keep the history of the run this one continues
        record["continues"] = {k: previous.get(k) for k in ("command", "steps", "train_seconds", "continues")}
    first, spent = 0, 0.0
    state_file = out / RESUME_FILE
    argv = [a for a in args.argv if a != "--resume"]
    if args.resume and state_file.is_file():  # pick up an interrupted run exactly where it saved
        state = torch.load(state_file, weights_only=False)
        if state["argv"] != argv:
            raise SystemExit(f"{state_file} was saved by another command ({' '.join(state['argv'])}); "
                             "resume with the same arguments or start a new --out")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        record, first, spent = state["record"], state["step"], state["seconds"]
        print(json.dumps({"resumed_at_step": first, "seconds": round(spent, 1)}), flush=True)
    t0 = time.perf_counter() - spent
    running, last_t, last_step = [], time.perf_counter(), first
    for step in range(first, args.steps):
        scenes = [video_world.sample_scene(rng, args.two_object_prob, args.static_prob, frames, size)
                  for _ in range(args.batch)]
        texts = [video_world.caption(s) if rng.random() >= args.caption_dropout else "" for s in scenes]
        x0 = batch_videos(scenes, rng, frames, size)
        states = captions(texts)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal; 1 = noise, 0 = video
        xt, target = flow_pair(x0, noise, sigma)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        pred = model(hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=states, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        optimise(loss, model, ema, opt, step, args.ema, warm=bool(args.init_from))
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            now = time.perf_counter()
            entry = dict(step=step + 1, loss=float(np.mean(running)), seconds=now - t0,
                         s_per_step=(now - last_t) / (step + 1 - last_step), lr=opt.param_groups[0]["lr"])
            running.clear()
            last_t, last_step = now, step + 1
            record["log"].append(entry)
            if not args.quiet:
                print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()}),
                      flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            record.update(steps=step + 1, train_seconds=time.perf_counter() - t0)
            save(ema, out, record)
            if args.resume:  # everything needed to continue bit for bit (not shipped: fp32 + optimiser)
                tmp = out / (RESUME_FILE + ".tmp")
                torch.save(dict(argv=argv, step=step + 1, seconds=record["train_seconds"], record=record,
                                model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                rng=rng.getstate(), gen=gen.get_state(), torch_rng=torch.get_rng_state()), tmp)
                tmp.replace(state_file)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the embedded moving-shapes Wan video model (CPU is fine).")
    p.add_argument("--steps", type=int, default=4000, help="optimiser steps (default 4000)")
    p.add_argument("--batch", type=int, default=4, help="videos per step (default 4; 8 frames x 16 x 16 = 2048 "
                                                        "tokens each)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate; cosine decay to a tenth of it at the end (default 1e-3)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="share of empty captions, for classifier-free guidance (default 0.1)")
    p.add_argument("--two-object-prob", type=float, default=0.5, help="share of two-object scenes (default 0.5)")
    p.add_argument("--static-prob", type=float, default=0.2, help="share of still objects (default 0.2)")
    p.add_argument("--frames", type=int, default=video_world.NUM_FRAMES, help="frames per video (default 8)")
    p.add_argument("--size", type=int, default=video_world.FRAME_SIZE, help="frame side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seeds the scenes, noise and timesteps (default 0)")
    p.add_argument("--log-every", type=int, default=10, help="steps between loss log lines (default 10)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (each overwrites --out)")
    p.add_argument("--resume", action="store_true",
                   help=f"save {RESUME_FILE} (fp32 weights, optimiser, RNG) in --out at every checkpoint and, "
                        "if one is there, continue from it: run the same command again after an interruption")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--init-from", metavar="DIR", help="start from this checkpoint's weights (a new schedule and "
                                                      "optimiser; use a new --seed)")
    p.add_argument("--config-overrides", default="", help="JSON dict of transformer config overrides (tests)")
    p.add_argument("--out", default=str(VIDEO_WEIGHTS_DIR), help="checkpoint directory")
    p.add_argument("--quiet", action="store_true", help="no log lines on stdout (training.json still has them)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
