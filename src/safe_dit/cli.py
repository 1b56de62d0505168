"""Command line: ``safe-dit COMMAND``. Thin: each command lives in its own module, imported when it runs."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

DESCRIPTION = """\
safe-dit: fast, exact-where-it-claims high-resolution Diffusion Transformer inference
(SAFE-DiT, arXiv 2606.29360) for PyTorch and diffusers.

  safe-dit generate      one image under dense / dense-fp / safe-core / safe-sw, with its sensitivity map
  safe-dit eval          prompt alignment, paired PSNR/SSIM and latency of every mode on the embedded model
  safe-dit pareto        speed-quality Pareto vs diffusers' cache hooks and step reduction, plus ablations
  safe-dit midt          measure the Mask-Induced Dispatch Tax of SDPA on this machine
  safe-dit audit         every attention call of Lumina-Next/PixArt/SD3/FLUX: masks, what safe-dit does, kernel
  safe-dit bench forward stock 'dense' vs exact fast path 'dense-fp' forward latency and memory
  safe-dit bench e2e     the four modes end to end through the Lumina-Next, PixArt, SD3 or FLUX pipeline
  safe-dit study make    paired images of two settings (same prompts and seeds) for a blinded human study
  safe-dit study serve   the study's blinded rating page on 127.0.0.1; votes kept in SQLite
  safe-dit study report  preference rates, a non-inferiority test, a per-prompt breakdown, PNG and JSON

Run 'safe-dit COMMAND --help' for the options of each command."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default shown."""


# command -> (module, its one-line help); a module is imported only when its command runs or shows its --help,
# so `safe-dit --help` and `--version` load neither torch nor diffusers.
COMMANDS = {
    "generate": ("safe_dit.generate", "generate an image under a safe-dit mode"),
    "eval": ("safe_dit.bench.quality", "quality and latency of every mode on the embedded model"),
    "pareto": ("safe_dit.bench.pareto", "Pareto of safe-dit vs peer accelerators, with ablations"),
    "midt": ("safe_dit.bench.midt", "measure the Mask-Induced Dispatch Tax"),
    "audit": ("safe_dit.audit", "audit every attention call of a model"),
}
BENCHES = {
    "forward": ("safe_dit.bench.forward", "dense vs dense-fp forward pass"),
    "e2e": ("safe_dit.bench.e2e", "dense / dense-fp / safe-core / safe-sw end to end"),
}
STUDY = {
    "make": ("safe_dit.study.make", "paired images of two settings, with a manifest"),
    "serve": ("safe_dit.study.server", "serve the blinded rating page"),
    "report": ("safe_dit.study.report", "preference rates and a non-inferiority test"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safe-dit")
    except PackageNotFoundError:  # a source tree on PYTHONPATH
        return "unknown"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` (all of them when None) is configured in full."""
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv if not a.startswith("-")]
    parser = argparse.ArgumentParser(prog="safe-dit", description=DESCRIPTION, formatter_class=_HelpFormatter,
                                     usage="safe-dit [-h] [--version] [-v] COMMAND ...")
    parser.add_argument("--version", action="version", version=f"safe-dit {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what safe-dit does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help=argparse.SUPPRESS)

    def add(subparsers, name, module, help_text, wanted, prog):
        p = subparsers.add_parser(name, help=help_text, formatter_class=_HelpFormatter, prog=prog)
        if wanted:
            mod = importlib.import_module(module)
            p.description = mod.__doc__
            mod.configure_parser(p)
        return p

    for name, (module, help_text) in COMMANDS.items():
        add(sub, name, module, help_text, argv is None or name in words[:1], f"safe-dit {name}")
    groups = (("bench", BENCHES, "benchmarks", "Side-by-side benchmarks of the modes.", "BENCH"),
              ("study", STUDY, "blinded human study of two settings",
               "A blinded pairwise human study of two settings: make the images, serve the rating page, report.\n"
               "  safe-dit study make --a dense-fp --b safe-core --out studies/mine\n"
               "  safe-dit study serve studies/mine        # open the printed URL, rate with <- -> =\n"
               "  safe-dit study report studies/mine", "STEP"))
    for group, commands, help_text, description, metavar in groups:
        g = sub.add_parser(group, help=help_text, description=description, prog=f"safe-dit {group}",
                           formatter_class=_HelpFormatter)
        g_sub = g.add_subparsers(dest=group, metavar=metavar, required=True)
        for name, (module, sub_help) in commands.items():
            add(g_sub, name, module, sub_help, argv is None or words[:2] == [group, name], f"safe-dit {group} {name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from safe_dit.config import SafeDitError

    previous = signal.signal(signal.SIGTERM, _terminated)  # like Ctrl-C: cleanup runs, then one line
    try:
        return int(args.func(args) or 0)
    except SafeDitError as err:
        print(f"safe-dit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safe-dit: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("safe-dit: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every ``finally`` (temporary files, caches) runs."""


def _terminated(_signum, _frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
