"""Z-Image's context-parallel split points (``ZImageAdapter.parallel_hooks``): the grid and pad rows split at the
first noise-refiner block with their RoPE rows, the caption refiner local, captions replicated in the unified
blocks, the final layer's grid rows gathered."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safe_dit.adapters.z_image import _final_layer, _padded
from safe_dit.config import SafeDitError

CP_ONLY = "context_parallel on Z-Image supports text-to-image only: {what}. Run it on one device"


@dataclass(frozen=True)
class LocalLayout:
    """Under context parallelism, this rank's rows of one forward: ``n`` image grid rows then ``nx - n`` image pad
    rows (shards of the N grid rows and of the pad rows, of ``full_nx`` image rows in all), each caption padded to
    ``caps``; ``rows`` [nx] where they sit among the image rows; ``text_mask`` [B, T] the captions' valid keys (None
    when alike), ``weights`` the real caption words [B, T] PCSP weighs."""

    n: int
    nx: int
    full_nx: int
    caps: tuple[int, ...]
    rows: torch.Tensor
    text_mask: torch.Tensor | None
    weights: torch.Tensor


def parallel_hooks(model, runtime, parallel) -> list:
    scheduled = runtime.config.scheduled

    def on_forward(_model, args, kwargs):  # the global facts of this forward: grid rows and caption lengths
        x = kwargs.get("x", args[0] if args else None)
        caps = kwargs.get("cap_feats", args[2] if len(args) > 2 else None)
        nested = isinstance(x[0], (list, tuple)) or isinstance(caps[0], (list, tuple))
        if not isinstance(x, (list, tuple)) or nested:
            raise SafeDitError(CP_ONLY.format(what="omni inputs (nested x / cap_feats)"))
        if kwargs.get("siglip_feats") is not None:
            raise SafeDitError(CP_ONLY.format(what="siglip_feats"))
        p, fp = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
        sizes = {tuple(xi.shape[1:]) for xi in x}
        if len(sizes) != 1:
            raise SafeDitError(CP_ONLY.format(what=f"images of different sizes {sorted(sizes)} in one batch"))
        f, h, w = sizes.pop()
        runtime.state.layout["z-image-global"] = ((f // fp) * (h // p) * (w // p), tuple(len(c) for c in caps))

    def on_refiner(index):
        def hook(_block, args):  # (x [B, Nx, D], mask, freqs [B, Nx, d/2], adaln, ...) -> this rank's rows
            state = runtime.state
            if index == 0:
                n, real = state.layout["z-image-global"]
                nx = args[0].shape[1]
                grid = parallel.local(n, "image tokens")
                pad = parallel.local(nx - n, "image pad tokens") if nx > n else (0, 0)
                rows = torch.cat([torch.arange(*grid), n + torch.arange(*pad)]).to(args[0].device)
                caps = tuple(_padded(r) for r in real)
                t, dev = max(caps), args[0].device
                valid = torch.arange(t, device=dev)[None] < torch.tensor(caps, device=dev)[:, None]
                weights = torch.arange(t, device=dev)[None] < torch.tensor(real, device=dev)[:, None]
                state.global_tokens = n
                state.layout["z-image"] = LocalLayout(grid[1] - grid[0], len(rows), nx, caps, rows,
                                                      None if len(set(caps)) == 1 else valid, weights)
            local = state.layout["z-image"]
            freqs = args[2][:, local.rows]  # [B, nx_local, d/2]
            x = args[0][:, local.rows] if index == 0 else args[0]
            return (x, args[1], freqs, *args[3:])
        return hook

    def on_block(_block, args):  # (unified [B, L, D], mask, freqs [B, Nx + T, d/2], ...) -> this rank's rows
        local = runtime.state.layout["z-image"]
        at = torch.cat([local.rows, local.full_nx + torch.arange(max(local.caps), device=local.rows.device)])
        return (args[0], None, args[2][:, at], *args[3:])  # the mask: this rank's layout is local.text_mask

    def on_final(_module, _inputs, out):  # [B, L_local, C] -> this rank's grid rows, before the gather
        if scheduled and runtime.generation is not None:
            return None  # the scheduled modes' own hook cut the rows
        return out[:, :runtime.state.layout["z-image"].n]

    hooks = [model.register_forward_pre_hook(on_forward, with_kwargs=True)]
    hooks += [b.register_forward_pre_hook(on_refiner(i)) for i, b in enumerate(model.noise_refiner)]
    hooks += [b.register_forward_pre_hook(on_block) for b in model.layers]
    return hooks + [_final_layer(model).register_forward_hook(on_final, prepend=True)]
