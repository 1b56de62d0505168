"""SW-CFG: sensitivity-weighted classifier-free guidance."""

from __future__ import annotations

import torch


def token_guidance(sensitivity: torch.Tensor, cfg_context: float, cfg_sensitive: float) -> torch.Tensor:
    """gamma_i = gamma_c + (gamma_s - gamma_c) * s_i, [B, N] from s [B, N] in [0, 1]."""
    return cfg_context + (cfg_sensitive - cfg_context) * sensitivity


def config_guidance(config, sensitivity: torch.Tensor) -> torch.Tensor:
    """Per-token gamma [B, N] for a SafeConfig; with ``sw_map=False`` (ablation) every token gets the
    guidance of the map's per-image mean, so only the spatial weighting is removed."""
    if not config.sw_map:
        sensitivity = sensitivity.mean(1, keepdim=True).expand_as(sensitivity)
    return token_guidance(sensitivity, config.cfg_context, config.cfg_sensitive)


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """eps = eps_u + gamma ⊙ (eps_c - eps_u); gamma broadcasts over channels ([B, 1, H, W])."""
    return eps_uncond + gamma * (eps_cond - eps_uncond)
