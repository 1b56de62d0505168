"""Chroma adapter (diffusers ``ChromaTransformer2DModel``, ``ChromaPipeline``): FLUX's blocks and processor, with
Chroma's caption mask.

Masks in the stock model. ``ChromaPipeline`` builds the caption mask in the text encoder's float dtype (1 on the
T5 tokens, ``</s>`` and one padding token, 0 on the rest of the 512) and concatenates ones for the image tokens:
a float [B, T + N] mask m. Every block turns it into ``m[:, None, None, :] * m[:, None, :, None]``, a float
[B, 1, L, L] tensor, which SDPA *adds to the logits*: the stock attention is softmax(q k^T s + m_i m_j) v. That
is not masking (diffusers issues 11724, 12116, 13619): a valid query row gets +1 on valid keys and 0 on padding
keys, so each padding key keeps e^-1 of its weight instead of none, and a padding query row is unbiased.

dense-fp reproduces that computation exactly and mask-free: the bias is the rank-1 outer product m_i m_j, so
one extra q/k channel carries it, q' = [q, m_i, 0...], k' = [k, m_j / s, 0...], v' = [v, 0...] (zero channels up
to a multiple of 8 for the flash kernels), s = 1/sqrt(d) the stock scale: s q'.k' = s q.k + m_i m_j, for any
float m. A mask whose every sample is constant (a row-constant bias) is dropped instead. Bool or integer masks
(a user's own) are kept exactly as the stock blocks pass them. Decided once per forward on the [B, L] mask the
model hands every block (one value read, none under torch.compile, where the rank-1 form is used).

safe-core: FLUX's SRSU (sensitive rows after ``x_embedder``, their RoPE rows, the anchor's joint K/V written in
place, outputs scattered after ``proj_out``); the extra channel follows the rows (m gathered at the selective
step's query rows, the cached keys carry theirs). PCSP reads the image-query x caption-key block of the biased
softmax (the extra channel included), weighting only real caption words (``</s>`` and the kept pad token are not).

Context parallelism: FLUX's split points (image tokens after ``x_embedder``, caption after ``context_embedder``,
the RoPE table into each part's rows). Each block's [B, T + N] mask is decided on the whole mask and split the same
way, so the extra q/k channel carries every pair's m_i m_j through the sequence-parallel call; a kept (bool/integer)
mask is refused there.

Refused: ``safe-sw`` and, in the scheduled modes, guidance > 1 (``ChromaPipeline`` makes separate conditional
and unconditional calls per step), a bool / integer mask, the mask-keeping ablations, ControlNet residuals.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock, ChromaTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

from safe_dit.adapters.contract import Adapter, register
from safe_dit.adapters.flux import FluxAdapter, SafeFluxAttnProcessor, _token_grid
from safe_dit.config import SafeDitError
from safe_dit.engine.generation import gather_rows
from safe_dit.engine.joint import joint_attention
from safe_dit.engine.schedule import SELECTIVE

NOTES = ("Chroma: ChromaPipeline's caption mask is float 0/1 and each block's outer product m_i m_j is added to the "
         "logits (+1 on valid pairs, not masking: padding keys keep e^-1 of their weight). dense-fp computes that "
         "bias exactly with no mask: one extra q/k channel (rank-1), decided once per forward; a constant mask is "
         "dropped, a bool/integer mask kept as shipped.")

NO_SW_CFG = ("safe-sw is not available for Chroma: ChromaPipeline calls the transformer separately for the "
             "conditional and the unconditional prediction, so there is no batched (eps_c - eps_u) whose weight "
             "SW-CFG "
             "could vary per token. Use mode='safe-core' (guidance <= 1) or 'dense-fp'")

KEPT_SCHEDULED = ("safe-core on Chroma needs the float caption mask ChromaPipeline builds (or none); this forward has "
                  "a {dtype} attention_mask, whose [B, 1, L, L] outer product cannot follow the sensitive rows. Pass "
                  "the mask as ChromaPipeline does (float), or use dense-fp")

ABLATION_SCHEDULED = ("safe-core on Chroma cannot keep the masks as shipped "
                      "(mask_elision=False / rewrite_padding=False): "
                      "each block's [B, 1, L, L] bias cannot follow the sensitive rows. Use those ablations with "
                      "mode='dense-fp'")

KEPT, ELIDED, RANK1 = "kept", "elided", "rank-1"


class MaskPlan:
    """Per forward: how each block's ``m_i m_j`` bias reaches attention, decided once per [B, L] mask object."""

    def __init__(self, config):
        self.config = config
        self.decided: list[tuple[torch.Tensor, str]] = []

    def reset(self) -> None:
        self.decided = []
        self.sharded: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []

    def shard(self, m: torch.Tensor, parallel, n_image: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Under context parallelism: this rank's rows of the [B, T + N] mask, [caption shard; image shard] as the
        joint sequence is split, and the caption's valid words [B, T] of the whole caption (for PCSP)."""
        for known, parts in self.sharded:
            if known is m:
                return parts
        text, image = m[:, :m.shape[1] - n_image], m[:, m.shape[1] - n_image:]
        local = torch.cat([parallel.shard(text, 1, "caption tokens"), parallel.shard(image, 1, "image tokens")], 1)
        self.sharded.append((m, (local, text > 0)))
        return local, text > 0

    def stand_in(self, m: torch.Tensor) -> torch.Tensor:
        """A [B, 1] tensor handed to the blocks in place of m (its outer product is never used)."""
        return m.new_ones(m.shape[0], 1)

    def kind(self, m: torch.Tensor) -> str:
        for known, kind in self.decided:
            if known is m:
                return kind
        kind = self._decide(m)
        self.decided.append((m, kind))
        return kind

    def _decide(self, m: torch.Tensor) -> str:
        cfg = self.config
        if m.dim() != 2 or not m.dtype.is_floating_point or not (cfg.mask_elision and cfg.rewrite_padding):
            return KEPT  # bool/int outer products are real masks; ablations keep every mask as shipped
        if torch.compiler.is_compiling():
            return RANK1  # exact for any float m, no value read
        if bool(torch.isnan(m).any()):
            return KEPT
        return ELIDED if bool((m == m[:, :1]).all()) else RANK1  # constant per sample: a row-constant bias


def _rank_one(q, k, v, rows_m, scale):
    """q/k/v [B, L, H, d] with the bias m_i m_j folded into extra channels: [B, L, H, d + e], e >= 1 and
    d + e a multiple of 8; s q'.k' = s q.k + m_i m_j for ``rows_m`` [B, L] (the same rows for q and k)."""
    b, n, h, d = q.shape
    e = (-(d + 1)) % 8 + 1
    ext = q.new_zeros(b, n, h, e)
    q_ext = ext.clone()
    q_ext[..., 0] = rows_m[:, :, None].to(q.dtype)
    k_ext = ext.clone()
    k_ext[..., 0] = (rows_m[:, :, None] / scale).to(k.dtype)
    return torch.cat([q, q_ext], -1), torch.cat([k, k_ext], -1), torch.cat([v, ext.to(v.dtype)], -1)


class SafeChromaAttnProcessor(SafeFluxAttnProcessor):
    """FLUX's safe-dit processor with Chroma's bias: the adapter's block pre-hook hands it the block's [B, L] mask
    (``compact_mask``) and its decision (``mask_kind``): kept as the stock [B, 1, L, L] mask, dropped, or folded
    into one q/k channel (then the block was given a [B, 1] stand-in, so no [B, 1, L, L] outer product is built)."""

    stock = FluxAttnProcessor
    compact_mask: torch.Tensor | None = None
    mask_kind: str | None = None
    text_valid: torch.Tensor | None = None  # under context parallelism: the whole caption's valid words [B, T]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, n_text, double = self._joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        m, kind, gen = self.compact_mask, self.mask_kind, self.runtime.generation
        if attention_mask is None:
            out = joint_attention(self, q, k, v, n_text, text_first=True)
        elif kind in (None, KEPT):  # a user's bool/int mask, an ablation, or a call outside the block
            if gen is not None:
                raise SafeDitError(KEPT_SCHEDULED.format(dtype=attention_mask.dtype))
            out = joint_attention(self, q, k, v, n_text, text_first=True, mask=attention_mask,
                                  stock_mask=lambda: attention_mask, compact=lambda _m: None)
        else:
            valid = self.text_valid if self.text_valid is not None else m[:, :n_text] > 0 if n_text else None
            if kind == ELIDED:
                out = joint_attention(self, q, k, v, n_text, text_first=True, text_valid=valid)
                self.runtime.record(self.name, "elided: a constant mask, row-constant bias m_i m_j")
            else:
                d = q.shape[-1]
                scale = d ** -0.5  # the stock call's (SDPA's default for head dim d)
                rows_m = m if gen is None or gen.kind != SELECTIVE else gather_rows(m, gen.joint_rows(n_text, True))
                q2, k2, v2 = _rank_one(q, k, v, rows_m, scale)
                out = joint_attention(self, q2, k2, v2, n_text, text_first=True, scale=scale,
                                      text_valid=valid)[..., :d]
                self.runtime.record(self.name, "rewritten: bias m_i m_j as one extra q/k channel (exact, no mask)")
        return self._joint_out(attn, out, n_text, double, q.dtype)


@register
class ChromaAdapter(Adapter):
    name = "chroma"
    model_classes = (ChromaTransformer2DModel,)
    notes = NOTES
    processor = SafeChromaAttnProcessor
    replaces = (FluxAttnProcessor,)
    passthrough = (FluxIPAdapterAttnProcessor,)  # dense-fp: IP-Adapter processors stay stock (mask as shipped)
    tokens_in = "x_embedder"
    tokens_out = "proj_out"
    grid = staticmethod(_token_grid)
    refused_inputs = ("controlnet_block_samples", "controlnet_single_block_samples")
    special_trailing_tokens = 2  # T5's </s> and the one padding token ChromaPipeline keeps valid
    cfg_pairs = False  # ChromaPipeline never batches [cond; uncond]: two calls per step with guidance > 1
    context_parallel = True  # FLUX's split points; each block's [B, T + N] mask split with the tokens (its bias
    # rides in the extra q/k channel through the sequence-parallel call, decided on the whole mask)

    def parallel_hooks(self, model, runtime, parallel) -> list:
        return FluxAdapter.parallel_hooks(self, model, runtime, parallel)

    def check(self, model, config) -> None:
        if config.mode == "safe-sw":
            raise SafeDitError(NO_SW_CFG)
        if config.scheduled and not (config.mask_elision and config.rewrite_padding):
            raise SafeDitError(ABLATION_SCHEDULED)

    def hooks(self, model, runtime, handle) -> list:
        plan = MaskPlan(runtime.config)
        for _module, proc in runtime.installed:
            if isinstance(proc, SafeChromaAttnProcessor):
                proc.plan = plan

        def on_forward(*_):
            plan.reset()

        def before(block, args, kwargs):  # the [B, L] mask this block would turn into its [B, 1, L, L] outer product
            proc = block.attn.processor
            if not isinstance(proc, SafeChromaAttnProcessor):
                return None
            at = 3 if isinstance(block, ChromaSingleTransformerBlock) else 4  # positional under checkpointing
            by_name = "attention_mask" in kwargs
            m = kwargs["attention_mask"] if by_name else (args[at] if len(args) > at else None)
            if not isinstance(m, torch.Tensor) or m.dim() != 2:
                proc.compact_mask, proc.mask_kind = None, None
                return None
            proc.compact_mask, proc.mask_kind = m, plan.kind(m)
            if proc.mask_kind == KEPT:
                return None
            if runtime.parallel is not None:  # this rank's rows of m (its outer product is never built)
                proc.compact_mask, proc.text_valid = plan.shard(m, runtime.parallel, runtime.state.global_tokens)
            stand_in = plan.stand_in(m)  # [B, 1]: the block's outer product is [B, 1, 1, 1], never [B, 1, L, L]
            if by_name:
                return args, dict(kwargs, attention_mask=stand_in)
            return (*args[:at], stand_in, *args[at + 1:]), kwargs

        def after(block, *_):
            proc = block.attn.processor
            if isinstance(proc, SafeChromaAttnProcessor):
                proc.compact_mask, proc.mask_kind, proc.text_valid = None, None, None

        hooks = [model.register_forward_pre_hook(on_forward)]
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            hooks += [block.register_forward_pre_hook(before, with_kwargs=True),
                      block.register_forward_hook(after, always_call=True)]
        return hooks
