"""Inspection: what a model's attention calls receive and what safe-dit makes of them (``audit``: one model's
SDPA calls, stock and with safe-dit; ``census``: the masks of every diffusers image and video transformer), and
what a measurement ran on (``environment``). Used by the commands and the benchmarks; imports only the library
below (api, adapters, kits)."""
