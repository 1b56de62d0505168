"""Command line: ``safe-dit {midt,audit,bench}``. Thin: each command lives in its own module."""

from __future__ import annotations

import argparse
import logging
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
  safe-dit bench e2e     the four modes end to end through the Lumina, SD3 or FLUX pipeline, speed and memory

Run 'safe-dit COMMAND --help' for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    from safe_dit import __version__, audit, generate
    from safe_dit.bench import e2e as bench_e2e
    from safe_dit.bench import forward as bench_forward
    from safe_dit.bench import quality
    from safe_dit.bench import midt
    from safe_dit.bench import pareto

    parser = argparse.ArgumentParser(
        prog="safe-dit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"safe-dit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what safe-dit does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate.configure_parser(sub.add_parser("generate", help="generate an image under a safe-dit mode",
                                             description=generate.__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    quality.configure_parser(sub.add_parser("eval", help="quality and latency of every mode on the embedded model",
                                             description=quality.__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    pareto.configure_parser(sub.add_parser("pareto", help="Pareto of safe-dit vs peer accelerators, with ablations",
                                           description=pareto.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    midt.configure_parser(sub.add_parser("midt", help="measure the Mask-Induced Dispatch Tax", description=midt.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    audit.configure_parser(sub.add_parser("audit", help="audit every attention call of a model", description=audit.__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    bench = sub.add_parser("bench", help="benchmarks", description="Side-by-side benchmarks of the modes.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    bench_forward.configure_parser(
        bench_sub.add_parser("forward", help="dense vs dense-fp forward pass", description=bench_forward.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    bench_e2e.configure_parser(
        bench_sub.add_parser("e2e", help="dense / dense-fp / safe-core / safe-sw end to end", description=bench_e2e.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from safe_dit.config import SafeDitError

    try:
        return int(args.func(args) or 0)
    except SafeDitError as err:
        print(f"safe-dit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
