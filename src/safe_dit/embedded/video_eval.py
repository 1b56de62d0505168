"""Grade a video checkpoint with the checker on a fixed prompt set: checkpoint selection and the model card.

Prompt sets are drawn by :func:`safe_dit.embedded.video_world.prompt_set` from a seed; prompt i is sampled
with noise seed ``seed + i``. The seeds have fixed roles: ``EVAL_SEED`` is the reported eval set,
``HELD_OUT_SEED`` the held-out report set and ``SELECTION_SEED`` the set checkpoints are chosen on; none of
them is a training seed (training draws its scenes from ``--seed``, 0 by default, in a stream of its own).

    python -m safe_dit.embedded.video_eval --model /work/ckpt-video --seed 102 --single 10 --two 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from safe_dit.embedded import video_grader, video_world
from safe_dit.embedded.video_model import VIDEO_WEIGHTS_DIR, frames_uint8, load_video_pipeline, video_weights_identity

EVAL_SEED = 100
HELD_OUT_SEED = 101
SELECTION_SEED = 102
STEPS = 30
GUIDANCE = 4.0


def generate(pipe, scenes: list[video_world.VideoScene], seed: int, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 4) -> list[np.ndarray]:
    """One video per scene (uint8 [F, S, S, 3]), prompt i with a generator seeded ``seed + i``; ``batch``
    prompts per pipeline call."""
    videos = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe([video_world.caption(s) for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np")
        videos += frames_uint8(out)
    return videos


def evaluate(pipe, scenes: list[video_world.VideoScene], seed: int, steps: int = STEPS,
             guidance: float = GUIDANCE) -> tuple[dict, list[np.ndarray]]:
    """(checker accuracy of ``pipe`` on ``scenes``: overall, one-object, two-object and per prompt; the videos)."""
    t0 = time.perf_counter()
    videos = generate(pipe, scenes, seed, steps, guidance)
    grades = [video_grader.grade(v, s) for v, s in zip(videos, scenes)]
    ones = [g for g, s in zip(grades, scenes) if len(s.objects) == 1]
    twos = [g for g, s in zip(grades, scenes) if len(s.objects) == 2]
    result = dict(prompts=len(scenes), seed=seed, steps=steps, guidance=guidance,
                  accuracy=video_grader.accuracy(grades),
                  accuracy_single_object=video_grader.accuracy(ones)["all"] if ones else None,
                  accuracy_two_object=video_grader.accuracy(twos)["all"] if twos else None,
                  seconds=time.perf_counter() - t0,
                  per_prompt=[dict(prompt=video_world.caption(s), **g) for s, g in zip(scenes, grades)])
    return result, videos


def strip(videos: list[np.ndarray], scenes: list[video_world.VideoScene], scale: int = 3):
    """A PIL image: for each scene its generated frames in a row and, below, the world's render of it."""
    from PIL import Image

    rows = []
    for video, scene in zip(videos, scenes):
        truth = video_world.render(scene, None, frames=len(video), size=video.shape[1])
        rows += [np.concatenate(list(video), axis=1), np.concatenate(list(truth), axis=1)]
    picture = np.concatenate(rows, axis=0)
    return Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Grade a moving-shapes video checkpoint with the checker.")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded video model)")
    p.add_argument("--seed", type=int, default=SELECTION_SEED,
                   help=f"prompt-set and noise seed (default {SELECTION_SEED}, the selection set; {EVAL_SEED} is the "
                        f"eval set, {HELD_OUT_SEED} the held-out one)")
    p.add_argument("--single", type=int, default=10, help="one-object prompts (default 10)")
    p.add_argument("--two", type=int, default=10, help="two-object prompts (default 10)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help=f"CFG scale (default {GUIDANCE})")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--save-videos", metavar="NPZ", help="also save the generated videos (uint8) to this .npz")
    p.add_argument("--strip", metavar="PNG",
                   help="also write a picture: per prompt, the generated frames left to right, and under them the "
                        "world's own render of the prompt (a fixed draw of its lanes), scaled 3x")
    p.add_argument("--json", metavar="PATH", help="write the result here as JSON (default: stdout only)")
    p.add_argument("--record", action="store_true",
                   help="add the summary to the checkpoint's training.json under 'evaluations' (the model card; "
                        "not on a directory a running training still writes to)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_video_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    scenes = video_world.prompt_set(args.single, args.two, args.seed)
    graded, videos = evaluate(pipe, scenes, args.seed, args.steps, args.guidance)
    result = dict(weights=video_weights_identity(args.model), **graded)
    if args.save_videos:
        np.savez_compressed(args.save_videos, videos=np.stack(videos),
                            prompts=np.array([video_world.caption(s) for s in scenes]))
    if args.strip:
        strip(videos, scenes).save(args.strip)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    summary = {k: result[k] for k in ("prompts", "seed", "steps", "guidance", "accuracy", "accuracy_single_object",
                                      "accuracy_two_object", "seconds")}
    if args.record:
        card = Path(args.model or VIDEO_WEIGHTS_DIR) / "training.json"
        record = json.loads(card.read_text()) if card.is_file() else {}
        role = {EVAL_SEED: "eval", HELD_OUT_SEED: "held-out", SELECTION_SEED: "selection"}.get(args.seed, "other")
        words = sys.argv[1:] if argv is None else argv
        summary["command"] = "python -m safe_dit.embedded.video_eval " + " ".join(words)
        record.setdefault("evaluations", {})[f"{role} (seed {args.seed})"] = summary
        card.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
