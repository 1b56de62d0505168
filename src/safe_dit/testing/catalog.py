"""The backbone kits' names, read from their ``KIT = Kit(...)`` declarations without importing them.

``safe_dit.testing.kits.KITS`` imports every kit module, and so torch and diffusers (seconds). The command line
needs only the kits' names to build its parsers and refuse a bad ``--model``; this module reads them from the
sources of the same modules ``KITS`` collects (``pkgutil`` over this package, ``ast`` on each file), so
``safe-dit generate --help`` stays torch-free and the lists still come from the kits: a new kit module is in
them without editing anything else. A declaration whose ``rank``/``name``/``label``/``tiny_name``/``real_preset``
are not literals (or module-level constants) cannot be read this way; then the kits are imported instead.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("rank", "name", "label", "tiny_name", "real_preset")
NOT_BACKBONES = frozenset({"catalog", "kit", "kits", "tiny", "parallel"})  # helper modules, no kit


@dataclass(frozen=True)
class Declared:
    """One kit as its module declares it."""

    rank: int
    name: str  # the adapter's name: --model of audit and bench e2e
    label: str  # for prose and reports
    tiny_name: str  # safe-dit generate --model
    real_preset: str  # the real model's attention shape (audit --preset, bench e2e's default)
    module: str  # safe_dit.testing.<module>
    video: bool = False  # a video backbone (its KIT gives frame_kwargs): generate writes a video
    text_prompts: bool = True  # its tiny pipeline takes text prompts offline (KIT's text_prompts)


class Unreadable(Exception):
    """A kit module's ``KIT = Kit(...)`` does not spell its names as literals."""


def _constants(tree: ast.Module) -> dict:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def read_declaration(source: str, module: str) -> Declared | None:
    """The kit ``source`` declares (None: it declares no ``KIT``); :class:`Unreadable` if not literal."""
    tree = ast.parse(source)
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "KIT" for t in node.targets)
                and isinstance(node.value, ast.Call)):
            consts, values = _constants(tree), {}
            for kw in node.value.keywords:
                if kw.arg in FIELDS:
                    if isinstance(kw.value, ast.Name) and kw.value.id in consts:
                        values[kw.arg] = consts[kw.value.id]
                    else:
                        try:
                            values[kw.arg] = ast.literal_eval(kw.value)
                        except ValueError:
                            raise Unreadable(f"{module}: KIT's {kw.arg} is not a literal") from None
            missing = [f for f in FIELDS if f not in values]
            if missing:
                raise Unreadable(f"{module}: KIT = Kit(...) does not name {', '.join(missing)} by keyword")
            given = {kw.arg: kw.value for kw in node.value.keywords}
            video = "frame_kwargs" in given and not (isinstance(given["frame_kwargs"], ast.Constant)
                                                     and given["frame_kwargs"].value is None)
            text = given.get("text_prompts", ast.Constant(True))
            if not isinstance(text, ast.Constant):
                raise Unreadable(f"{module}: KIT's text_prompts is not a literal")
            return Declared(**values, module=module, video=video, text_prompts=bool(text.value))
    return None


def _read_all() -> list[Declared]:
    package = importlib.import_module("safe_dit.testing")  # its __init__ is empty: no torch
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in NOT_BACKBONES or info.ispkg:
            continue
        path = Path(info.module_finder.path) / f"{info.name}.py"
        if not path.is_file():
            raise Unreadable(f"{info.name}: no source file")
        declared = read_declaration(path.read_text(encoding="utf-8"), f"safe_dit.testing.{info.name}")
        if declared is not None:
            found.append(declared)
    return sorted(found, key=lambda d: (d.rank, d.name))


def declared_kits() -> list[Declared]:
    """Every kit in rank order, as its module declares it (the kits are imported only when a declaration
    cannot be read statically)."""
    try:
        return _read_all()
    except (Unreadable, SyntaxError, OSError):
        from safe_dit.testing.kits import KITS

        return [Declared(k.rank, k.name, k.label, k.tiny_name, k.real_preset, "", k.frame_kwargs is not None,
                         k.text_prompts) for k in KITS.values()]


def kit_names() -> list[str]:
    """The kits' names (``--model`` of audit and bench e2e), in rank order."""
    return [d.name for d in declared_kits()]


def tiny_names(video: bool | None = None, text_prompts: bool | None = None) -> list[str]:
    """The kits' tiny pipelines (``safe-dit generate --model``), in rank order; ``video``/``text_prompts`` True or
    False: only the video (image) ones, only those that take (refuse) text prompts offline."""
    return [d.tiny_name for d in declared_kits()
            if video in (None, d.video) and text_prompts in (None, d.text_prompts)]


def declared(tiny_name: str) -> Declared | None:
    """The kit whose tiny pipeline is ``tiny_name`` (None: no kit's)."""
    return next((d for d in declared_kits() if d.tiny_name == tiny_name), None)


def labels(last: str = "and", video: bool | None = None) -> str:
    """The kits' labels as prose: 'Lumina-Next, PixArt, ... and Chroma' (``video`` True/False: the video/image
    backbones alone)."""
    names = [d.label for d in declared_kits() if video in (None, d.video)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"
