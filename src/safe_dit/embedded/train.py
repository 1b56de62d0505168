"""Train the embedded default model (``safe_dit.embedded.model``) on the shapes world.

Rectified flow in Lumina's convention: x_t = t * image + (1 - t) * noise with t ~ logit-normal,
the model (first 3 of its 6 output channels; Lumina's pipeline drops the other half) regresses
image - noise. Captions are dropped (replaced by "", the pipeline's negative prompt) with
probability ``--caption-dropout`` so classifier-free guidance works. Text states, RoPE and the
proportional-attention scale are computed exactly as the pipeline computes them at 64x64.
An EMA of the weights is what gets saved (fp16 safetensors + config + training.json).

    python scripts/train_default_model.py --steps 6000 --out src/safe_dit/embedded/weights/shapes-lumina
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
from tqdm.auto import tqdm

from safe_dit.embedded import world
from safe_dit.embedded.model import (
    TRANSFORMER_CONFIG,
    WEIGHTS_DIR,
    encode_prompts,
    load_text_encoder,
    proportional_attention_kwargs,
)
from safe_dit.inspection.environment import environment


def build_transformer(seed: int, **overrides) -> LuminaNextDiT2DModel:
    cfg = dict(TRANSFORMER_CONFIG, **overrides)
    torch.manual_seed(seed)
    model = LuminaNextDiT2DModel(**cfg)
    with torch.no_grad():
        model.pad_token.normal_(0.0, 0.02)  # torch.empty upstream: make it deterministic
    return model


def pipeline_conditioning(config, size: int) -> tuple[torch.Tensor, dict, float]:
    """RoPE, cross_attention_kwargs and RoPE's linear factor exactly as LuminaPipeline computes them for a square
    ``size``-px image: its scaling_factor is size / sample_size, applied linearly (positions interpolated) below the
    default watershed, i.e. at every step; proportional attention keeps the sample_size base."""
    head_dim = config.hidden_size // config.num_attention_heads
    linear = size / config.sample_size
    rope = get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, linear_factor=linear, ntk_factor=1.0)
    return rope, proportional_attention_kwargs(config.sample_size), linear


class CaptionCache:
    """Text states per caption, computed once (the caption space is finite)."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.encoder, self.cache = tokenizer, encoder, {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            states, mask = encode_prompts(self.tokenizer, self.encoder, missing)
            for i, c in enumerate(missing):
                n = int(mask[i].sum())
                self.cache[c] = states[i, :n].clone()
        # pad to a multiple of 8, as the pipeline's tokenizer call does
        seqs = [self.cache[c] for c in captions]
        length = max(8, -(-max(s.shape[0] for s in seqs) // 8) * 8)
        out = torch.zeros(len(seqs), length, seqs[0].shape[-1])
        mask = torch.zeros(len(seqs), length, dtype=torch.int64)
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        return out, mask


def batch_images(scenes, rng: random.Random, size: int = world.IMAGE_SIZE) -> torch.Tensor:
    imgs = np.stack([world.render(s, rng, size) for s in scenes])  # [B, H, W, 3] uint8
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def save(model: LuminaNextDiT2DModel, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def train(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer, encoder = load_text_encoder()
    captions = CaptionCache(tokenizer, encoder)
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    # sample_size is the size the pipeline scales RoPE and the attention temperature from (Lumina-Next's resolution
    # extrapolation: at a larger image the positions are interpolated by image/sample_size, the proportional
    # attention keeps the sample_size base); trained at --size with that scaling, so that diffusers' stock
    # LuminaPipeline at --size reproduces training exactly.
    rope_base = args.rope_base or args.size
    if args.size % rope_base:
        raise SystemExit(f"--rope-base {rope_base} must divide --size {args.size}")
    overrides.setdefault("sample_size", rope_base)
    model = build_transformer(args.seed, **overrides).train()
    previous = {}
    if args.init_from:  # continue from a saved (EMA, fp16) checkpoint; the optimiser starts afresh
        start = LuminaNextDiT2DModel.from_pretrained(args.init_from, dtype=torch.float32)
        model.load_state_dict(start.state_dict())
        card = Path(args.init_from) / "training.json"
        previous = json.loads(card.read_text()) if card.is_file() else {}
    if not args.no_fast_path:
        # safe-dit's own exact path: the all-valid image mask elided, caption padding split by length.
        # Same loss and gradients as stock (tests/embedded/test_train.py), ~1.6x faster per step at 1024 tokens.
        from safe_dit.api import apply_safe_dit
        from safe_dit.config import SafeConfig
        apply_safe_dit(model, SafeConfig(mode="dense-fp"))
    ema = build_transformer(args.seed, **overrides).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    rope, xattn, linear = pipeline_conditioning(model.config, args.size)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    size = args.size
    record = dict(
        data=f"shapes world (safe_dit.embedded.world): {size}x{size}, 1-2 objects, "
             f"{len(world.COLORS)} colours x {len(world.SHAPES)} shapes x {len(world.POSITIONS)} cells, "
             f"{len(world.BACKGROUNDS)} backgrounds, two-object probability {args.two_object_prob}",
        command="python scripts/train_default_model.py " + " ".join(args.argv),
        image_size=size, rope_linear_factor=linear,
        transformer_config=dict(model.config), parameters=n_params, text_encoder="all-MiniLM-L6-v2",
        seed=args.seed, batch=args.batch, fast_path=not args.no_fast_path, lr=args.lr, ema=args.ema,
        caption_dropout=args.caption_dropout,
        environment=environment("cpu"), log=[],
    )
    if previous:  # keep the history of the run this one continues
        record["continues"] = {k: previous.get(k) for k in ("command", "steps", "train_seconds", "continues")}
    first, spent = 0, 0.0
    state_file = out / RESUME_FILE
    if args.resume and state_file.is_file():  # pick up an interrupted run exactly where it saved
        state = torch.load(state_file, weights_only=False)
        if state["argv"] != [a for a in args.argv if a != "--resume"]:
            raise SystemExit(f"{state_file} was saved by another command ({' '.join(state['argv'])}); "
                             "resume with the same arguments or start a new --out")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        record, first, spent = state["record"], state["step"], state["seconds"]
    t0 = time.perf_counter() - spent
    running = []
    bar = tqdm(range(first, args.steps), desc="train", disable=args.quiet, initial=first, total=args.steps)
    for step in bar:
        scenes = [world.sample_scene(rng, args.two_object_prob) for _ in range(args.batch)]
        texts = [world.caption(s) if rng.random() >= args.caption_dropout else "" for s in scenes]
        x0 = batch_images(scenes, rng, size)
        states, mask = captions(texts)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal, 0 = noise, 1 = image
        xt = t[:, None, None, None] * x0 + (1 - t[:, None, None, None]) * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        pred = model(hidden_states=xt, timestep=t, encoder_hidden_states=states, encoder_mask=mask,
                     image_rotary_emb=rope, cross_attention_kwargs=xattn, return_dict=False)[0][:, :3]
        loss = torch.nn.functional.mse_loss(pred, x0 - noise)
        optimise(loss, model, ema, opt, step, args.ema, warm=bool(args.init_from))
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            entry = dict(step=step + 1, loss=float(np.mean(running)), seconds=time.perf_counter() - t0)
            running.clear()
            record["log"].append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if args.quiet:
                print(json.dumps(entry), flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            record.update(steps=step + 1, train_seconds=time.perf_counter() - t0)
            save(ema, out, record)
            if args.resume:  # everything needed to continue bit for bit (not shipped: fp32 + optimiser)
                tmp = out / (RESUME_FILE + ".tmp")
                torch.save(dict(argv=[a for a in args.argv if a != "--resume"], step=step + 1,
                                seconds=record["train_seconds"], record=record, model=model.state_dict(),
                                ema=ema.state_dict(), opt=opt.state_dict(), rng=rng.getstate(),
                                gen=gen.get_state(), torch_rng=torch.get_rng_state()), tmp)
                tmp.replace(state_file)
    if args.resume and state_file.is_file():
        state_file.unlink()  # finished: the shipped checkpoint is complete
    return record


RESUME_FILE = "resume.pt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the embedded shapes Lumina-Next model (CPU is fine).")
    p.add_argument("--steps", type=int, default=6000,
                   help="optimiser steps (default 6000; ~1.3 s each on 2 CPU cores)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate; cosine decay to a tenth of it at the end (default 1e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default 200)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="share of empty captions, for classifier-free guidance (default 0.1)")
    p.add_argument("--two-object-prob", type=float, default=0.5, help="share of two-object scenes (default 0.5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the scenes, noise and timesteps (use a new one when continuing)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss log lines")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (each overwrites --out)")
    p.add_argument("--size", type=int, default=world.IMAGE_SIZE, choices=(64, 128),
                   help="image size in pixels: 64 (256 tokens) or 128 (1024 tokens, patch 4); default 64")
    p.add_argument("--rope-base", type=int, default=0,
                   help="the transformer's sample_size, from which Lumina-Next's pipeline scales RoPE (positions / "
                        "(size / rope-base)) and the attention temperature; 64 fine-tunes the 64-px model at 128 "
                        "under the stock resolution extrapolation (default: --size, no scaling)")
    p.add_argument("--resume", action="store_true",
                   help=f"save {RESUME_FILE} (fp32 weights, optimiser, RNG) in --out at every checkpoint and, "
                        "if one is there, continue from it: run the same command again after an interruption")
    p.add_argument("--no-fast-path", action="store_true",
                   help="train through stock attention (masked SDPA) instead of safe-dit's exact dense-fp path")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--init-from", metavar="DIR", help="start from this checkpoint (e.g. the shipped weights)")
    p.add_argument("--config-overrides", default="", help="JSON dict of transformer config overrides (tests)")
    p.add_argument("--out", default=str(WEIGHTS_DIR),
                   help="checkpoint directory (default: the package's embedded weights)")
    p.add_argument("--quiet", action="store_true", help="JSON log lines instead of a progress bar")
    return p


def optimise(loss: torch.Tensor, model: torch.nn.Module, ema: torch.nn.Module, opt, step: int, ema_decay: float,
             warm: bool = False) -> None:
    """One optimiser step (gradients clipped at 1) and the EMA update; a cold start ramps the EMA decay up from
    1/10 (``warm``, continuing from a checkpoint: the full decay from the first step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        decay = ema_decay if warm else min(ema_decay, (1 + step) / (10 + step))
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def run_command(parser: argparse.ArgumentParser, train_fn, argv: list[str] | None = None) -> int:
    """A training command: parse ``argv`` (the process's by default), train, print the record's summary as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    record = train_fn(args)
    print(json.dumps({k: record[k] for k in ("steps", "train_seconds", "parameters")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
