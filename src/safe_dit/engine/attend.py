"""One attention call: which mask reaches the kernel, and the call itself through diffusers' dispatcher.

Model-agnostic. safe-dit decides only the mask (drop it by provenance, keep it as the stock processor
would pass it, or rewrite it exactly into mask-free calls); the attention itself goes through
``diffusers.models.attention_dispatch.dispatch_attention_fn``, so the backend a user chose
(``set_attention_backend``, ``attention_backend(...)``) and a parallel config are honoured.
Tensors are in the dispatcher's layout, [B, L, H, d].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn

from safe_dit.config import SafeDitError
from safe_dit.engine.masks import EXP_UNDERFLOW, KeyPaddingPlan, MaskDecision, discarded_bias_max, sdpa_with_plan
from safe_dit.engine.parallel import MASK_UNDER_CP, cpu_ring_attention, needs_cpu_lse
from safe_dit.engine.partition import image_to_text_probs

# Backends whose kernels group query heads over fewer K/V heads themselves (SDPA's enable_gqa).
_GQA_BACKENDS = frozenset({AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH,
                           AttentionBackendName._NATIVE_EFFICIENT, AttentionBackendName.FLEX})

PARALLEL_REFUSED = ("safe-dit does not run under diffusers' own context parallelism (enable_parallelism): its input "
                    "split would shard the masks and sensitive rows safe-dit decides, which is silently wrong. Pass "
                    "SafeConfig(context_parallel=ContextParallelConfig(...)) instead (safe-dit splits and gathers "
                    "itself), or remove_safe_dit and run the stock model under enable_parallelism")


@dataclass
class ForwardState:
    """Per-forward scratch state: lives from the model's forward pre-hook to its post-hook.

    Masks are matched by object identity (``is``), never by value: a handful of entries per
    forward, and identity checks trace cleanly under torch.compile."""

    certified: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    decisions: list[tuple[torch.Tensor, MaskDecision]] = field(default_factory=list)
    spread_checks: list = field(default_factory=list)  # device bools: a bias rewrite's assumption failed in a call
    global_tokens: int | None = None  # under context parallelism: the image tokens of all ranks (global lengths)
    layout: dict = field(default_factory=dict)  # an adapter's facts about this forward's sequence layout

    def certify(self, mask: torch.Tensor, why: str) -> None:
        """Record that ``mask`` (this very tensor object) is all-valid by construction."""
        self.certified.append((mask, why))

    def certification(self, mask: torch.Tensor) -> str | None:
        for known, why in self.certified:
            if known is mask:
                return why
        return None

    def key_padding_decision(self, mask: torch.Tensor, rewrite: bool, compact=None) -> MaskDecision:
        """Decide once per forward for a compact key-padding mask [B, Lk] of unknown origin.

        ``compact`` (optional) turns the mask as the model ships it into that [B, Lk] valid-key form,
        or None when it is no padding mask (then it is kept). Under torch.compile no value is read
        (a graph break and a host sync per call): the mask is kept as shipped, exact by definition."""
        if torch.compiler.is_compiling():
            return _KEPT_UNDER_COMPILE
        for known, decision in self.decisions:
            if known is mask:
                return decision
        valid = mask if compact is None else compact(mask)
        decision = _KEPT_NOT_PADDING if valid is None else decide_key_padding(valid, rewrite)
        if decision.plan is not None and not decision.plan.elide:
            bias = discarded_bias_max(mask, valid)
            if bias is not None:
                decision = MaskDecision(decision.verdict, decision.plan, discard_margin=-bias)
        self.decisions.append((mask, decision))
        return decision

    def check_spread(self, query: torch.Tensor, key: torch.Tensor, scale: float | None, margin: float) -> None:
        """Queue, on the device (no host sync), whether this call's logits could spread far enough for a key
        discarded by a bias of ``-margin`` to keep a nonzero weight: |q.k| s <= s max|q| max|k| bounds every logit."""
        s = query.shape[-1] ** -0.5 if scale is None else scale
        bound = 2 * s * query.float().norm(dim=-1).amax() * key.float().norm(dim=-1).amax()
        self.spread_checks.append(bound >= margin - EXP_UNDERFLOW)

    def verify(self) -> None:
        """Once per forward: refuse the output if a bias rewrite's exactness assumption failed in any call."""
        if self.spread_checks and bool(torch.stack(self.spread_checks).any()):
            raise SafeDitError(
                "a caption-padding bias was rewritten as dropped keys, but in this forward the attention logits "
                "spread so far that the dropped keys keep a nonzero weight in the stock computation: "
                "the rewrite would not be "
                "exact. Use SafeConfig(rewrite_padding=False) (masks kept as shipped) for this model or input")


_KEPT_UNDER_COMPILE = MaskDecision("kept: padding (torch.compile: no value reads)")
_KEPT_NOT_PADDING = MaskDecision("kept: semantic (not a key-padding mask)")


def decide_key_padding(mask: torch.Tensor, rewrite: bool) -> MaskDecision:
    plan = KeyPaddingPlan.from_key_mask(mask)
    if plan is None:
        return MaskDecision("kept: semantic (a sample has no valid key)")
    if plan.elide:
        return MaskDecision("elided: all-valid (by value, once per forward)", plan)
    if not rewrite:
        return MaskDecision("kept: padding")
    return MaskDecision(plan.verdict + " (exact)", plan)


class Dispatch:
    """What a safe-dit processor carries for the dispatcher. diffusers' ``set_attention_backend`` and
    ``enable_parallelism`` set these two attributes on every attention processor of a model."""

    _attention_backend = None
    _parallel_config = None
    stock = None  # the stock processor class a safe-dit processor stands in for


def _gqa_native(backend) -> bool:
    name = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else AttentionBackendName(backend)
    return name in _GQA_BACKENDS


def dispatch(query, key, value, mask=None, scale=None, processor: Dispatch | None = None,
             sequence: bool = True) -> torch.Tensor:
    """[B, Lq, H, d] x [B, Lk, Hkv, d] -> [B, Lq, H, d] through diffusers' dispatcher. Fewer K/V heads than
    query heads (GQA) use the kernel's own grouping where the backend has one, else K/V are repeated.

    Under safe-dit's context parallelism (the runtime's ``parallel``), a ``sequence`` call (its queries and keys
    are this rank's shard of the sequence) goes through the dispatcher's Ulysses/ring attention with the parallel
    config; a call that is not (caption cross-attention: every rank holds all captions) runs locally."""
    backend = getattr(processor, "_attention_backend", None)
    if getattr(processor, "_parallel_config", None) is not None:  # set by diffusers' enable_parallelism
        raise SafeDitError(PARALLEL_REFUSED)
    runtime = getattr(processor, "runtime", None)
    parallel = getattr(runtime, "parallel", None) if sequence else None
    gqa = key.shape[2] != query.shape[2]
    if gqa and (parallel is not None or not _gqa_native(backend)):  # diffusers' templated CP attention has no GQA
        n_rep = query.shape[2] // key.shape[2]
        key, value = (t.repeat_interleave(n_rep, dim=2) for t in (key, value))
        gqa = False
    if parallel is None:
        return dispatch_attention_fn(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa, backend=backend)
    if mask is not None:
        raise SafeDitError(MASK_UNDER_CP.format(where=getattr(processor, "name", "attention")))
    if needs_cpu_lse(parallel, query, _is_native(backend)):
        return cpu_ring_attention(parallel, query, key, value, scale)
    return dispatch_attention_fn(query, key, value, scale=scale, backend=backend, parallel_config=parallel.config)


def _is_native(backend) -> bool:
    name = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else AttentionBackendName(backend)
    return name == AttentionBackendName.NATIVE


def attend(runtime, name: str, query, key, value, mask, scale, *, rewrite: bool, stock_mask: Callable,
           compact=None, processor: Dispatch | None = None, sequence: bool = True) -> torch.Tensor:
    """One attention call, q [B, Lq, H, d], k/v [B, Lk, Hkv, d] -> [B, Lq, H, d]: no mask; a mask certified
    by provenance (dropped, no value read); or a mask decided once per forward: kept as the stock
    processor passes it (``stock_mask()``, in SDPA's [B, H, Lq, Lk] broadcast form) or rewritten exactly
    into mask-free calls. ``sequence``: q/k are the (possibly sharded) token sequence, False for caption
    cross-attention (local under context parallelism)."""
    def run(q, k, v, m=None):
        return dispatch(q, k, v, m, scale, processor, sequence)

    if mask is None:
        runtime.record(name, "no mask")
        return run(query, key, value)
    if not runtime.config.mask_elision:  # ablation: every mask exactly as the stock processor passes it
        runtime.record(name, "kept: fast path off (ablation)")
        return run(query, key, value, stock_mask())
    state = runtime.state
    if state is not None:
        why = state.certification(mask)
        if why is not None:
            runtime.record(name, "elided: " + why)
            return run(query, key, value)
    if sequence and getattr(runtime, "parallel", None) is not None:  # a mask of unknown origin, sharded: its value on
        # this rank says nothing of the others' (and every rank must decide alike, or the collectives hang)
        raise SafeDitError(MASK_UNDER_CP.format(where=name))
    if state is None:  # called outside a model forward: decide for this call alone
        state = ForwardState()
    decision = state.key_padding_decision(mask, rewrite, compact)
    runtime.record(name, decision.verdict)
    if decision.keep:
        return run(query, key, value, stock_mask())
    if decision.discard_margin is not None:
        state.check_spread(query, key, scale, decision.discard_margin)
    return sdpa_with_plan(query, key, value, decision.plan, attend=run, seq_dim=1)


def collect_text_probs(runtime, gen, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None):
    """PCSP tap on a cross-attention call: query [B, N, H, d], caption keys [B, T, Hkv, d], valid keys [B, T] or
    None; the image->text probabilities [B, N, T] go to the generation with the runtime's token weights."""
    k = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)  # [B, T, H, d]: small
    probs = image_to_text_probs(query.transpose(1, 2), k.transpose(1, 2), valid)  # [B, N, T]
    gen.collect(probs, runtime.text_weights(valid, probs.shape[-1], probs.device))
