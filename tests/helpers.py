"""Shared test instruments: what reaches SDPA, and the processors a model holds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def processors(model) -> dict:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


class SdpaSpy(TorchFunctionMode):
    """Every mask handed to F.scaled_dot_product_attention (``None`` for a mask-free call)."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)
