"""safe-dit: SAFE-DiT for PyTorch/diffusers (arXiv 2606.29360)."""

__version__ = "0.1.0"

from safe_dit.config import MODES, SafeConfig, SafeDitError  # noqa: E402
from safe_dit.api import apply_safe_dit, generation, remove_safe_dit, is_safe_dit_applied  # noqa: E402

__all__ = [
    "MODES",
    "SafeConfig",
    "SafeDitError",
    "apply_safe_dit",
    "generation",
    "remove_safe_dit",
    "is_safe_dit_applied",
    "__version__",
]
