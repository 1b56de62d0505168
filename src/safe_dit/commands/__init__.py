"""The subcommands of ``safe-dit`` (the entry point is ``safe_dit.cli:main``).

Each command is one module with ``configure_parser(parser)``, which sets ``func`` (the body, called with the
parsed arguments). The table below names them; a module is imported only when its command runs or shows its
--help, so ``safe-dit --help`` and ``--version`` load neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import importlib

from safe_dit.testing import catalog

DESCRIPTION = """\
safe-dit: fast, exact-where-it-claims high-resolution Diffusion Transformer inference
(SAFE-DiT, arXiv 2606.29360) for PyTorch and diffusers.

  safe-dit generate      one image under dense / dense-fp / safe-core / safe-sw, with its sensitivity map
  safe-dit eval          prompt alignment, paired PSNR/SSIM and latency of every mode on the embedded model
  safe-dit pareto        speed-quality Pareto vs diffusers' cache hooks and step reduction, plus ablations
  safe-dit midt          measure the Mask-Induced Dispatch Tax of SDPA on this machine
  safe-dit audit         every attention call of one backbone's model: masks, what safe-dit does, kernel
  safe-dit bench forward stock 'dense' vs exact fast path 'dense-fp' forward latency and memory
  safe-dit bench e2e     the four modes end to end through one backbone's diffusers pipeline
  safe-dit study make    paired images of two settings (same prompts and seeds) for a blinded human study
  safe-dit study serve   the study's blinded rating page on 127.0.0.1; votes kept in SQLite
  safe-dit study report  preference rates, a non-inferiority test, a per-prompt breakdown, PNG and JSON

Backbones: {backbones}.
Run 'safe-dit COMMAND --help' for the options of each command."""

# command -> (module, its one-line help)
COMMANDS = {
    "generate": ("safe_dit.commands.generate", "generate an image under a safe-dit mode"),
    "eval": ("safe_dit.commands.eval", "quality and latency of every mode on the embedded model"),
    "pareto": ("safe_dit.commands.pareto", "Pareto of safe-dit vs peer accelerators, with ablations"),
    "midt": ("safe_dit.commands.midt", "measure the Mask-Induced Dispatch Tax"),
    "audit": ("safe_dit.commands.audit", "audit every attention call of a model"),
}
BENCHES = {
    "forward": ("safe_dit.commands.bench_forward", "dense vs dense-fp forward pass"),
    "e2e": ("safe_dit.commands.bench_e2e", "dense / dense-fp / safe-core / safe-sw end to end"),
}
STUDY = {
    "make": ("safe_dit.study.make", "paired images of two settings, with a manifest"),
    "serve": ("safe_dit.study.server", "serve the blinded rating page"),
    "report": ("safe_dit.study.report", "preference rates and a non-inferiority test"),
}
GROUPS = {
    "bench": (BENCHES, "benchmarks", "Side-by-side benchmarks of the modes.", "BENCH"),
    "study": (STUDY, "blinded human study of two settings",
              "A blinded pairwise human study of two settings: make the images, serve the rating page, report.\n"
              "  safe-dit study make --a dense-fp --b safe-core --out studies/mine\n"
              "  safe-dit study serve studies/mine        # open the printed URL, rate with <- -> =\n"
              "  safe-dit study report studies/mine", "STEP"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default shown once, as ``(default: VALUE)``, unless the help
    already says what happens without the option (``None: ...``) or the option is a switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch or "default" in text.lower() or "None:" in text or default is None or default == "" \
                or default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return text + " (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safe-dit")
    except PackageNotFoundError:  # a source tree on PYTHONPATH
        return "unknown"


def _configure(p: argparse.ArgumentParser, module: str) -> None:
    mod = importlib.import_module(module)
    p.description = mod.description() if hasattr(mod, "description") else mod.__doc__
    mod.configure_parser(p)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` (all of them when None) is configured in full."""
    words = None if argv is None else [a for a in argv if not a.startswith("-")]
    parser = argparse.ArgumentParser(prog="safe-dit", description=DESCRIPTION.format(backbones=catalog.labels()),
                                     formatter_class=HelpFormatter, usage="safe-dit [-h] [--version] [-v] COMMAND ...")
    parser.add_argument("--version", action="version", version=f"safe-dit {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what safe-dit does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help=argparse.SUPPRESS)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=HelpFormatter, prog=f"safe-dit {name}")
        if words is None or words[:1] == [name]:
            _configure(p, module)
    for group, (commands, help_text, description, metavar) in GROUPS.items():
        g = sub.add_parser(group, help=help_text, description=description, prog=f"safe-dit {group}",
                           formatter_class=HelpFormatter)
        g_sub = g.add_subparsers(dest=group, metavar=metavar, required=True)
        for name, (module, sub_help) in commands.items():
            p = g_sub.add_parser(name, help=sub_help, formatter_class=HelpFormatter, prog=f"safe-dit {group} {name}")
            if words is None or words[:2] == [group, name]:
                _configure(p, module)
    return parser
