"""Backbone adapters, registered by model class. Importing this package registers them."""

from .base import Adapter, Handle, Runtime, adapter_for, supported_classes  # noqa: F401
from . import lumina_next  # noqa: F401  (registers the Lumina-Next adapter)
from . import pixart  # noqa: F401  (registers the PixArt adapter)
from . import sd3  # noqa: F401  (registers the SD3 adapter)
from . import flux  # noqa: F401  (registers the FLUX adapter)
