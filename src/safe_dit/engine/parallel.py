"""Context parallelism (the sequence split over devices) on diffusers' own machinery. Model-agnostic.

safe-dit uses diffusers' ``ContextParallelConfig`` (ulysses, ring and their ``*_anything`` variants), its
sharders and all-gathers (``EquipartitionSharder``, ``PartitionAnythingSharder``) and its dispatcher's
templated Ulysses/ring attention; it does not use ``enable_parallelism``'s input plan, because safe-dit splits
*after* the token embedders (so that masks, RoPE rows and the sensitive rows are decided per shard from the
global picture) and gathers after the last per-token layer, in its own hooks. An adapter declares where.

What stays global: every length-dependent quantity (Lumina's proportional scale, PCSP's top-K) is computed
from the global lengths; caption cross-attention runs locally (every rank holds all caption tokens). Joint
attention either splits the caption with the image tokens (no caption mask: SD3, FLUX, Chroma) or keeps the whole
caption on every rank, attends its keys locally (their padding rewritten exactly) and merges that part with the
sequence-parallel image part by log-sum-exp (``engine.joint.replicated_text_attention``: Lumina-Image-2.0,
Qwen-Image, Z-Image).

CPU/gloo workarounds, used only where the tensors are on the CPU (never on a GPU path):
* diffusers computes ``rank % torch.accelerator.device_count()`` for the device, which divides by zero on a
  CPU-only machine: safe-dit builds the mesh and calls ``ContextParallelConfig.setup`` itself.
* ring attention needs each chunk's log-sum-exp, which diffusers' native backend does not return: on the CPU
  the chunks go through torch's own CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``), which
  does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from safe_dit.config import SafeDitError

NO_GROUP = ("context_parallel needs an initialised torch.distributed process group (run under torchrun, or call "
            "torch.distributed.init_process_group first); one process runs without context_parallel")
MASK_UNDER_CP = ("a mask would reach a sequence-parallel attention call ({where}); under context parallelism a kept "
                 "mask is silently wrong (diffusers' ring reuses the local mask for every rotated K/V chunk, and a "
                 "padding rewrite would slice local keys). Only masks safe-dit elides exactly can run sharded: run "
                 "this input on one device")


class SequenceParallel:
    """One patched model's context-parallel setup: diffusers' config with its device mesh, and the shard
    arithmetic (which rows of a length-n sequence this rank holds). Lives on the model's runtime."""

    def __init__(self, cp: ContextParallelConfig):
        if not isinstance(cp, ContextParallelConfig):
            raise SafeDitError(f"context_parallel must be a diffusers ContextParallelConfig, got {type(cp).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise SafeDitError(NO_GROUP)
        self.cp = cp
        self.degree = cp.ring_degree * cp.ulysses_degree
        if cp._mesh is None:  # set up once per config, as enable_parallelism would (the same config may be reapplied)
            world = dist.get_world_size()
            if cp.mesh is None and self.degree != world:
                raise SafeDitError(f"context_parallel degree {self.degree} (ring {cp.ring_degree} x ulysses "
                                   f"{cp.ulysses_degree}) must equal the world size {world} (or pass a mesh)")
            device_type = _device_type()
            mesh = cp.mesh or dist.device_mesh.init_device_mesh(device_type, cp.mesh_shape,
                                                                mesh_dim_names=cp.mesh_dim_names)
            cp.setup(dist.get_rank(), world, _device(device_type), mesh)
        self.config = ParallelConfig(context_parallel_config=cp)  # what the dispatcher reads
        self.anything = cp.ulysses_anything or cp.ring_anything
        self.mesh = cp._flattened_mesh
        self.rank = dist.get_rank(self.mesh.get_group())

    @property
    def mode(self) -> str:
        kind = "ring" if self.cp.ring_degree > 1 else "ulysses"
        return f"{kind}{'_anything' if self.anything else ''}:{self.degree}"

    # -- shard arithmetic -----------------------------------------------------------------------
    def bounds(self, n: int, what: str = "tokens") -> list[tuple[int, int]]:
        """[start, stop) of every rank's shard of a length-``n`` sequence, as diffusers' sharders cut it
        (``tensor_split``; equal chunks without an ``*_anything`` mode, which must divide ``n``)."""
        if not self.anything and n % self.degree:
            raise SafeDitError(f"{n} {what} do not split evenly over context-parallel degree {self.degree} "
                               f"({self.mode}): use a size whose token count it divides, or ulysses_anything / "
                               "ring_anything")
        if n < self.degree:
            raise SafeDitError(f"{n} {what} cannot be split over {self.degree} ranks")
        size, extra = divmod(n, self.degree)
        starts = [r * size + min(r, extra) for r in range(self.degree + 1)]
        return [(starts[r], starts[r + 1]) for r in range(self.degree)]

    def local(self, n: int, what: str = "tokens") -> tuple[int, int]:
        return self.bounds(n, what)[self.rank]

    def shard(self, x: torch.Tensor, dim: int = 1, what: str = "tokens") -> torch.Tensor:
        """This rank's rows of ``x`` along ``dim`` (diffusers' sharder)."""
        self.bounds(x.shape[dim], what)  # a clear error before diffusers' assert
        if self.anything:
            return PartitionAnythingSharder.shard_anything(x, dim, self.mesh)
        return EquipartitionSharder.shard(x, dim, self.mesh)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's rows of ``x`` along ``dim``, in rank order (diffusers' all-gather)."""
        if self.anything and x.device.type == "cpu":  # gloo's all_gather takes equal sizes only
            return _gather_uneven_cpu(x, dim, self.mesh.get_group())
        if self.anything:
            return PartitionAnythingSharder.unshard_anything(x, dim, self.mesh)
        return EquipartitionSharder.unshard(x, dim, self.mesh)

    def check_heads(self, heads: int, name: str) -> None:
        """Ulysses splits heads: without ``ulysses_anything`` their count must divide by its degree."""
        u = self.cp.ulysses_degree
        if u > 1 and not self.cp.ulysses_anything and heads % u:
            raise SafeDitError(f"{name} has {heads} attention heads, not divisible by ulysses degree {u}: use "
                               "ulysses_anything, or ring")

    def local_partition(self, index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The global sensitive rows index [B, K] (ascending) as this rank's local rows [B, Kp], padded to the
        same count Kp on every rank and sample (plain Ulysses needs equal lengths): a sample's rows are padded by
        repeating its last local row (computing a row twice writes the same values: exact); a sample with no
        sensitive row on this rank gets Kp placeholder rows and ``valid`` False there (their results are
        discarded: the cached K/V and output stay). ``valid`` is None when every sample has a local row."""
        b = index.shape[0]
        counts, lows = [], []
        for start, stop in self.bounds(n):
            inside = (index >= start) & (index < stop)  # [B, K]; contiguous since ascending
            counts.append(inside.sum(1))  # [B]
            lows.append(torch.searchsorted(index, torch.full((b, 1), start, device=index.device)).squeeze(1))
        kp = max(1, int(torch.stack(counts).max()))
        start = self.local(n)[0]
        count, low = counts[self.rank], lows[self.rank]  # [B]
        pos = low[:, None] + torch.minimum(torch.arange(kp, device=index.device)[None],
                                           (count - 1).clamp_min(0)[:, None])
        rows = index.gather(1, pos.clamp_max(index.shape[1] - 1)) - start  # [B, Kp]
        has = count > 0
        rows = torch.where(has[:, None], rows, torch.zeros_like(rows))
        valid = None if bool(has.all()) else has[:, None].expand(b, kp).contiguous()
        return rows, valid


def _gather_uneven_cpu(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather of unequal shards on gloo (CPU only): pad every shard to the longest, gather, trim. diffusers'
    ``_all_gather_anything`` hands gloo unequal buffers, which it rejects."""
    from diffusers.models._modeling_parallel import gather_size_by_comm

    sizes = gather_size_by_comm(x.shape[dim], group)
    longest = max(sizes)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous() if pad[dim] else x.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def _device_type() -> str:
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return "cpu" if acc is None else acc.type


def _device(device_type: str) -> torch.device:
    if device_type == "cpu":  # diffusers' rank % device_count() divides by zero here
        return torch.device("cpu")
    return torch.device(device_type, torch.accelerator.current_device_index())


# -- the attention call --------------------------------------------------------------------------------

def _cpu_lse_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward-op contract ([B, L, H, d] in; out and, if asked, log-sum-exp [B, L, H]) on torch's CPU
    flash kernel, which returns the log-sum-exp that ring attention merges chunks with. CPU only."""
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # [B, H, L, d]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                          attn_mask=attn_mask, scale=scale)
    out = out.permute(0, 2, 1, 3)
    return (out, lse.transpose(1, 2).contiguous()) if return_lse else out


def attention_with_lse(query, key, value, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One local mask-free attention call that also returns each query's log-sum-exp: q [B, Lq, H, d], k/v
    [B, Lk, H, d] -> (out [B, Lq, H, d], lse [B, Lq, H] float32). torch's CPU flash kernel on the CPU, its
    memory-efficient kernel on CUDA, else the plain softmax."""
    if query.device.type == "cpu":
        return _cpu_lse_forward_op(None, query, key, value, scale=scale, return_lse=True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, L, d]
    if query.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        return out.transpose(1, 2), lse[..., :q.shape[2]].transpose(1, 2).float()  # lse may be padded along Lq
    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * s  # [B, H, Lq, Lk]
    lse = logits.logsumexp(-1)
    out = torch.einsum("bhqk,bhkd->bhqd", (logits - lse[..., None]).exp(), v.float()).to(query.dtype)
    return out.transpose(1, 2), lse.transpose(1, 2)


def _lse_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward-op contract on :func:`attention_with_lse` (mask-free calls, any device)."""
    if attn_mask is not None or is_causal or dropout_p:
        raise SafeDitError("safe-dit's log-sum-exp attention takes mask-free, non-causal calls only")
    out, lse = attention_with_lse(query, key, value, scale)
    return (out, lse) if return_lse else out


def sequence_attention_with_lse(parallel: SequenceParallel, query, key, value, scale=None, backend=None):
    """A sequence-parallel mask-free attention call (diffusers' templated Ulysses/ring attention) that also returns
    the log-sum-exp of each of this rank's queries over the keys of every rank: (out [B, Lq, H, d], lse [B, Lq, H]).
    Queries and keys may differ in length (e.g. replicated caption queries over the sharded image keys). The
    native backend (the default) goes through :func:`attention_with_lse`; another backend is asked for its own."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention, dispatch_attention_fn

    name = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else AttentionBackendName(backend)
    if name == AttentionBackendName.NATIVE:
        out, lse = _templated_context_parallel_attention(query, key, value, None, 0.0, False, scale, False, True,
                                                         forward_op=_lse_forward_op, backward_op=_no_backward,
                                                         _parallel_config=parallel.config)
    else:
        out, lse = dispatch_attention_fn(query, key, value, scale=scale, return_lse=True, backend=backend,
                                         parallel_config=parallel.config)
    return out, (lse.squeeze(-1) if lse.dim() == 4 else lse).float()


def _no_backward(*_args, **_kwargs):
    raise NotImplementedError("safe-dit's CPU ring attention is for inference only")


def needs_cpu_lse(parallel: SequenceParallel, query: torch.Tensor, backend_is_native: bool) -> bool:
    """Ring on the CPU with the native backend: the log-sum-exp shim is needed (never on a GPU tensor)."""
    return parallel.cp.ring_degree > 1 and query.device.type == "cpu" and backend_is_native


def cpu_ring_attention(parallel: SequenceParallel, query, key, value, scale):
    """diffusers' templated ring (or ring-anything) attention with the CPU log-sum-exp forward op."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    return _templated_context_parallel_attention(query, key, value, None, 0.0, False, scale, False, False,
                                                 forward_op=_cpu_lse_forward_op, backward_op=_no_backward,
                                                 _parallel_config=parallel.config)


# -- hooks (an adapter says which of its modules they go on) --------------------------------------------

def split_tokens(runtime, parallel: SequenceParallel, what: str = "image tokens", image: bool = True):
    """Forward hook on a token embedder ([B, L, D] out): this rank's rows. ``image``: these are the image tokens,
    whose global count the forward's state records (global lengths for scales and the partition)."""

    def hook(_module, _inputs, x):  # x [B, L, D]
        if image and runtime.state is not None:
            runtime.state.global_tokens = x.shape[1]
        return parallel.shard(x, 1, what)  # [B, L_local, D]

    return hook


def gather_tokens(parallel: SequenceParallel):
    """Forward hook on the last per-token layer: every rank's rows again, [B, N, C], in order."""

    def hook(_module, _inputs, x):  # x [B, N_local, C]
        return parallel.gather(x.contiguous(), 1)

    return hook


def check_heads(model: torch.nn.Module, parallel: SequenceParallel) -> None:
    """Refuse, at apply time, attention modules whose head count Ulysses cannot split."""
    for name, module in model.named_modules():
        heads = getattr(module, "heads", None)
        if hasattr(module, "processor") and isinstance(heads, int):
            parallel.check_heads(heads, name)
