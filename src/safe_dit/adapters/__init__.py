"""Backbone adapters, registered by model class. Importing this package registers them."""

from safe_dit.adapters.base import Adapter, Handle, Runtime, adapter_for, supported_classes  # noqa: F401
from safe_dit.adapters import lumina_next  # noqa: F401  (registers the Lumina-Next adapter)
from safe_dit.adapters import pixart  # noqa: F401  (registers the PixArt adapter)
from safe_dit.adapters import sd3  # noqa: F401  (registers the SD3 adapter)
from safe_dit.adapters import flux  # noqa: F401  (registers the FLUX adapter)
