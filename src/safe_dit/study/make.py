"""Make a blinded study: the images of two settings, A and B, on the same prompts and the same seeds, plus a
manifest (both settings in full, every prompt, seed and image hash, the model's weights, the machine).

A setting (--a, --b) is written NAME[:FIELD=VALUE,...][@STEPS]:

  NAME          a mode -- dense, dense-fp, safe-core, safe-sw, with SafeConfig's current defaults -- or any
                setting of `safe-dit pareto`: its safe-core sweep, ablations, peer caches (e.g.
                "mag-cache(threshold=0.12)", run on dense-fp as there) and step reductions ("steps x0.50");
                --list prints them all
  :FIELD=VALUE  SafeConfig fields over NAME's config, e.g. "safe-core:keep_ratio=0.5,anchor_interval=3"
  @STEPS        this side samples with STEPS steps (default: --steps, or a step reduction's own fraction)

Prompts: on the embedded shapes model, by default the world's seeded prompt set that `safe-dit eval` draws
(--single one-object, then --two two-object scenes, from --seed); or --prompts FILE, one prompt a line
(blank lines and lines starting with # skipped). Prompt i is sampled with seed --seed + i on both sides, so
any image can be redrawn alone with `safe-dit generate PROMPT --seed SEED` under the same setting.

Images get random names under DIR/images (neither the name nor the URL the page uses says which side made
it). Everything is written at the end, together (nothing half-written if the run fails or is interrupted).

  safe-dit study make --a dense-fp --b safe-core --out studies/mine
  safe-dit study make --a dense-fp --b "mag-cache(threshold=0.12)" --out studies/magcache
  safe-dit study make --a dense-fp@30 --b dense-fp@15 --prompts my_prompts.txt --out studies/steps
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import secrets
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from safe_dit.config import MODES, SafeConfig, SafeDitError
from safe_dit.study import FORMAT, IMAGES, MANIFEST, VOTES

logger = logging.getLogger(__name__)

MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 1_000
CALIBRATION_SEED = 10_000  # MagCache calibrates on a held-out prompt and seed, as `safe-dit pareto` does
_NOT_SETTABLE = ("mode", "pcsp_blocks", "text_importance")


@dataclass(frozen=True)
class Side:
    """One side of the study: the setting as the user wrote it, what it resolved to, its step count."""

    spec: str
    setting: object  # safe_dit.bench.pareto_settings.Setting
    steps: int

    def record(self) -> dict:
        s = self.setting
        return dict(spec=self.spec, name=s.name, family=s.family, mode=s.safe.mode, config=dataclasses.asdict(s.safe),
                    peer=s.peer.method if s.peer else None, peer_params=s.peer.params if s.peer else None,
                    steps=self.steps, note=s.note)


def known_settings() -> dict:
    """Name -> Setting: the four modes at SafeConfig's defaults, then every `safe-dit pareto` setting."""
    from safe_dit.bench.pareto_settings import Setting, default_settings

    out = {m: Setting(m, "safe-dit", SafeConfig(m), note="SafeConfig defaults") for m in MODES}
    for s in default_settings():
        out.setdefault(s.name, s)
    return out


def _coerce(field: str, text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise SafeDitError(f"{field}={text!r}: expected true or false")
    try:
        return type(current)(text)
    except ValueError:
        raise SafeDitError(f"{field}={text!r}: expected a {type(current).__name__}") from None


def parse_side(spec: str, base_steps: int) -> Side:
    """``NAME[:FIELD=VALUE,...][@STEPS]`` -> Side (one-line SafeDitError naming what is wrong)."""
    settings = known_settings()
    text, steps = spec.strip(), None
    if "@" in text:
        text, _, tail = text.rpartition("@")
        if not tail.isdigit() or int(tail) < 1:
            raise SafeDitError(f"setting {spec!r}: '@{tail}' must be a step count >= 1, e.g. dense-fp@15")
        steps = int(tail)
    name, overrides = text, ""
    if name not in settings and ":" in name:
        name, _, overrides = name.partition(":")
    if name not in settings:
        raise SafeDitError(f"unknown setting {name!r}: use a mode ({', '.join(MODES)}) or a `safe-dit pareto` "
                           f"setting; `safe-dit study make --list` prints them")
    setting = settings[name]
    if overrides:
        fields = {f.name for f in dataclasses.fields(SafeConfig)}
        changes = {}
        for item in overrides.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in fields or key in _NOT_SETTABLE:
                settable = sorted(fields - set(_NOT_SETTABLE))
                raise SafeDitError(f"setting {spec!r}: {item!r} is not FIELD=VALUE with a SafeConfig field of "
                                   f"{', '.join(settable)}")
            changes[key] = _coerce(key, value.strip(), getattr(setting.safe, key))
        setting = dataclasses.replace(setting, name=f"{name}:{overrides}",
                                      safe=dataclasses.replace(setting.safe, **changes))
    return Side(spec, setting, steps if steps is not None else setting.steps(base_steps))


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and ``#`` comments skipped; refused when empty, too long or not text."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SafeDitError(f"--prompts {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise SafeDitError(f"--prompts {str(path)!r} is a directory: name a text file, one prompt a line") from None
    except UnicodeDecodeError:
        raise SafeDitError(f"--prompts {str(path)!r} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SafeDitError(f"--prompts {str(path)!r} holds no prompt (one a line; # starts a comment)")
    if len(prompts) > MAX_PROMPTS:
        raise SafeDitError(f"--prompts {str(path)!r} holds {len(prompts)} prompts; "
                           f"a study takes at most {MAX_PROMPTS}")
    for i, p in enumerate(prompts):
        if len(p) > MAX_PROMPT_CHARS:
            raise SafeDitError(f"--prompts {str(path)!r}: prompt {i + 1} is {len(p)} characters long "
                               f"(at most {MAX_PROMPT_CHARS})")
    return prompts


def configure_parser(p) -> None:
    p.add_argument("--a", metavar="SETTING", help="side A, the reference (e.g. dense-fp)")
    p.add_argument("--b", metavar="SETTING", help="side B, the one tested for non-inferiority (e.g. safe-core)")
    p.add_argument("--out", metavar="DIR", help="the study folder (new or empty; --overwrite replaces a study "
                                                "without votes)")
    p.add_argument("--list", action="store_true", help="print every setting name --a/--b take, then exit")
    p.add_argument("--prompts", metavar="FILE", help="one prompt a line (None: on the embedded model, its "
                                                     "world's seeded prompt set)")
    p.add_argument("--single", type=int, default=12, help="world prompts with one object (no --prompts)")
    p.add_argument("--two", type=int, default=12, help="world prompts with two objects (no --prompts)")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the world's prompt set; prompt i is sampled with seed SEED + i on both sides")
    p.add_argument("--model", default="default",
                   help="'default' (the embedded 64x64 shapes model), a shapes transformer folder written by "
                        "safe_dit.embedded.train, or any --model of `safe-dit generate` (local diffusers pipeline)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (None: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (None: the model's native size)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps of a side without @STEPS")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale, both sides")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (None: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the study in --out (refused if it has votes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SafeDitError(f"--out {str(out)!r} is a file: name a folder for the study")
    if out.is_dir():
        if any(out.glob(VOTES + "*")):
            raise SafeDitError(f"--out {str(out)!r} holds votes ({VOTES}): new images would orphan them; move the "
                               f"folder away or choose another")
        if (out / MANIFEST).is_file() and not overwrite:
            raise SafeDitError(f"--out {str(out)!r} already holds a study: "
                               "--overwrite replaces it, or choose another folder")
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise SafeDitError(f"--out {str(out)!r} is not empty and holds no study: choose a new or empty folder")
    from safe_dit.bench.files import check_creatable

    check_creatable(out, out)


def _check(args) -> None:
    from safe_dit.bench.pipelines import EMBEDDED_MAX_SIDE, SEED_MAX, check_size

    if not args.a or not args.b or not args.out:
        raise SafeDitError("--a, --b and --out are required (e.g. --a dense-fp --b safe-core --out studies/mine)")
    if args.steps < 1:
        raise SafeDitError("--steps must be >= 1")
    if not args.guidance == args.guidance or abs(args.guidance) == float("inf"):
        raise SafeDitError(f"--guidance must be a finite number, got {args.guidance}")
    if args.single < 0 or args.two < 0 or (args.prompts is None and args.single + args.two == 0):
        raise SafeDitError("--single and --two must be >= 0 and not both 0")
    if args.single + args.two > MAX_PROMPTS:
        raise SafeDitError(f"a study takes at most {MAX_PROMPTS} prompts")
    if not 0 <= args.seed <= SEED_MAX - MAX_PROMPTS:
        raise SafeDitError(f"--seed must be in 0..{SEED_MAX - MAX_PROMPTS} (prompt i takes seed SEED + i)")
    check_size(args)
    if _is_shapes_model(args.model) and max(args.height or 0, args.width or 0) > EMBEDDED_MAX_SIDE:
        raise SafeDitError(f"--height and --width must be at most {EMBEDDED_MAX_SIDE} pixels for a shapes model")
    if args.model != "default" and not _is_shapes_model(args.model) and args.prompts is None:
        raise SafeDitError(f"--model {args.model!r} is not a shapes model: give your prompts with --prompts FILE")
    _check_out(Path(args.out), args.overwrite)


def _is_shapes_model(model: str) -> bool:
    """The embedded model, or a folder holding a shapes transformer alone (not a diffusers pipeline)."""
    p = Path(model)
    return model == "default" or (p.is_dir() and (p / "config.json").is_file()
                                  and not (p / "model_index.json").exists())


def _load(model: str, device: str):
    import torch

    from safe_dit.bench.pipelines import load_pipeline
    from safe_dit.embedded.model import load_default_pipeline, weights_identity

    if _is_shapes_model(model):
        path = None if model == "default" else model
        return load_default_pipeline(path).to(device), weights_identity(path)
    return load_pipeline(model, torch.float32, device), {"path": model}


def _draw(pipe, prompt: str, seed: int, steps: int, height: int, width: int, guidance: float):
    """One image as ``safe-dit generate`` calls the pipeline (uint8 HxWx3) and its seconds."""
    import numpy as np
    import torch

    from safe_dit.bench.pipelines import call_kwargs

    kwargs = call_kwargs(pipe, SimpleNamespace(height=height, width=width, steps=steps, guidance=guidance, seed=seed,
                                               negative_prompt=""))
    t0 = time.perf_counter()
    with torch.no_grad():
        image = pipe(prompt, output_type="np", **kwargs).images[0]
    seconds = time.perf_counter() - t0
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), seconds


def run(args, pipe=None, weights: dict | None = None) -> int:
    """The command; ``pipe`` (with its ``weights`` identity): an already loaded pipeline of ``args.model``."""
    if args.list:
        known = known_settings()
        width = max(map(len, known)) + 2  # names may hold spaces; two spaces end each
        for name, s in known.items():
            print(f"{name:{width}}{s.family:9} {s.note}")
        return 0
    _check(args)
    sides = {"a": parse_side(args.a, args.steps), "b": parse_side(args.b, args.steps)}
    prompts_file = Path(args.prompts) if args.prompts else None
    prompts = read_prompts(prompts_file) if prompts_file else None  # refused before the model loads
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from safe_dit.bench.files import write_together
    from safe_dit.bench.pareto_runs import Harness
    from safe_dit.bench.peers import PeerUnsupported
    from safe_dit.bench.pipelines import native_size
    from safe_dit.bench.quality import prompt_set, psnr
    from safe_dit.embedded import world
    from safe_dit.inspection.environment import environment

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = _is_shapes_model(args.model)
    if prompts is None:
        prompts = [world.caption(s) for s in prompt_set(args.single, args.two, args.seed)]
        source = dict(kind="embedded world", seed=args.seed, single=args.single, two=args.two)
    else:
        source = dict(kind="file", path=str(prompts_file), sha256=_file_sha256(prompts_file))
    if shapes:
        outside = [p for p in prompts if not world.in_world(p)]
        if outside:
            logger.warning("%d of %d prompts are outside the shapes world (%s): the model draws noise or the nearest "
                           "scene it knows for them", len(outside), len(prompts), world.VOCABULARY_HINT)
    if pipe is None:
        pipe, weights = _load(args.model, device)
    pipe.set_progress_bar_config(disable=True)
    height = args.height or native_size(pipe, "default" if shapes else args.model)
    width = args.width or native_size(pipe, "default" if shapes else args.model)
    calibration = world.caption(world.sample_scene(random.Random(CALIBRATION_SEED))) if shapes else prompts[0]
    harnesses = {k: Harness(pipe, side.steps, lambda n: _draw(pipe, calibration, CALIBRATION_SEED, n, height, width,
                                                               args.guidance))
                 for k, side in sides.items()}
    out = Path(args.out)
    images, pairs = {}, []
    bar = tqdm(total=2 * len(prompts), desc="study images", disable=args.no_progress, file=sys.stderr)
    for i, prompt in enumerate(prompts):
        seed = args.seed + i
        entry = dict(id=f"p{i:03d}" if len(prompts) <= 1000 else f"p{i:05d}", prompt=prompt, seed=seed)
        drawn = {}
        for key, side in sides.items():
            try:
                undo = harnesses[key].setup(side.setting)(pipe)
            except PeerUnsupported as err:
                raise SafeDitError(f"--{key} {side.spec!r} cannot run on this model: {err}") from None
            try:
                img, seconds = _draw(pipe, prompt, seed, side.steps, height, width, args.guidance)
            finally:
                undo()
            name = f"{secrets.token_hex(8)}.png"
            images[out / IMAGES / name] = Image.fromarray(img)
            drawn[key] = img
            entry[key] = dict(image=name, seconds=seconds)
            bar.update()
        entry["psnr_b_vs_a"] = min(psnr(drawn["b"], drawn["a"]), 100.0)  # 100: identical images
        pairs.append(entry)
    bar.close()
    seconds = {k: statistics.median(p[k]["seconds"] for p in pairs) for k in sides}
    manifest = dict(
        format=FORMAT, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        a=sides["a"].record(), b=sides["b"].record(),
        model=args.model, weights=weights, height=height, width=width, guidance=args.guidance, seed=args.seed,
        prompts=source, median_seconds=seconds, speedup_b_vs_a=seconds["a"] / seconds["b"],
        command=_command(args), pairs=pairs,
        environment=environment(device),
    )
    stale = set((out / IMAGES).glob("*.png")) if (out / IMAGES).is_dir() else set()
    created = [d for d in (out, out / IMAGES) if not d.exists()]
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    try:
        write_together(images, manifest, out / MANIFEST, root=out)
    except BaseException:
        for d in reversed(created):  # the folders this run made, when still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    for old in stale - set(images):  # --overwrite: the replaced study's images
        old.unlink()
    print(f"wrote {out / MANIFEST} and {len(images)} images: {len(pairs)} pairs, A = {sides['a'].spec}, "
          f"B = {sides['b'].spec}; rate them with: safe-dit study serve {out}", file=sys.stderr)
    sys.stdout.write(json.dumps(dict(study=str(out), pairs=len(pairs), a=sides["a"].spec, b=sides["b"].spec,
                                     speedup_b_vs_a=manifest["speedup_b_vs_a"])) + "\n")
    return 0


def _command(args) -> str:
    """The command that remakes this study (new random image names, the same images)."""
    words = ["safe-dit", "study", "make", "--a", args.a, "--b", args.b, "--out", args.out, "--model", args.model,
             "--seed", str(args.seed), "--steps", str(args.steps), "--guidance", str(args.guidance)]
    words += ["--prompts", args.prompts] if args.prompts else ["--single", str(args.single), "--two", str(args.two)]
    words += [w for k in ("height", "width") if getattr(args, k) for w in (f"--{k}", str(getattr(args, k)))]
    return shlex.join(words)


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
