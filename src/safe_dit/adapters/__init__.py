"""Backbone adapters, registered by model class. Importing this package registers every adapter module in it.

Each module is imported on its own: one whose diffusers classes this diffusers lacks (an older release)
is skipped with a debug log, and only its backbone is unsupported.
"""

import importlib
import logging
import pkgutil

from safe_dit.adapters.contract import (  # noqa: F401
    Adapter,
    SafeProcessor,
    adapter_for,
    register,
    registered_adapters,
    supported_classes,
)
from safe_dit.engine.runtime import Handle, Runtime  # noqa: F401

logger = logging.getLogger(__name__)
SKIPPED: dict[str, str] = {}  # adapter module -> why it could not be imported

for _info in pkgutil.iter_modules(__path__):
    if _info.name == "contract":
        continue
    try:
        importlib.import_module(f"{__name__}.{_info.name}")
    except ImportError as err:  # e.g. a diffusers without this backbone's classes
        SKIPPED[_info.name] = str(err)
        logger.debug("safe-dit adapter %s unavailable: %s", _info.name, err)
