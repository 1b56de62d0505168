"""User-facing configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("dense", "dense-fp", "safe-core", "safe-sw")
IMPLEMENTED_MODES = ("dense", "dense-fp")


class SafeDitError(ValueError):
    """Raised for invalid configuration or input that safe-dit refuses to handle."""


@dataclass(frozen=True)
class SafeConfig:
    """How safe-dit should run a model.

    mode:
        ``dense``     the stock model, masks as shipped (baseline; applying it changes nothing).
        ``dense-fp``  the exact fast path: provenance-certified redundant masks are elided,
                      semantics-bearing masks are kept or rewritten exactly.
        ``safe-core`` / ``safe-sw``: spatial scheduling (not available in this release).
    rewrite_padding:
        In ``dense-fp``, rewrite key-padding masks (e.g. caption padding in cross-attention)
        into exact mask-free calls by gathering each sample's valid keys. ``False`` keeps them.
    """

    mode: str = "dense-fp"
    rewrite_padding: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise SafeDitError(f"invalid mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode not in IMPLEMENTED_MODES:
            raise SafeDitError(
                f"mode {self.mode!r} is part of SAFE-DiT but not implemented in safe-dit "
                f"{_version()} yet; available modes: {', '.join(IMPLEMENTED_MODES)}"
            )
        if not isinstance(self.rewrite_padding, bool):
            raise SafeDitError(f"rewrite_padding must be a bool, got {type(self.rewrite_padding).__name__}")

    @property
    def fast_path(self) -> bool:
        return self.mode != "dense"


def _version() -> str:
    from . import __version__

    return __version__
