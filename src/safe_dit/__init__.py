"""safe-dit: SAFE-DiT for PyTorch/diffusers (arXiv 2606.29360)."""

__version__ = "0.5.0"

from safe_dit.config import MODES, SafeConfig, SafeDitError  # noqa: E402  (no torch import)

_API = ("apply_safe_dit", "generation", "remove_safe_dit", "is_safe_dit_applied")


def __getattr__(name):  # the API (torch, diffusers) loads on first use: `safe-dit --help` stays fast
    if name in _API:
        from safe_dit import api

        return getattr(api, name)
    raise AttributeError(f"module 'safe_dit' has no attribute {name!r}")


__all__ = ["MODES", "SafeConfig", "SafeDitError", *_API, "__version__"]
