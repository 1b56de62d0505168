"""Wan adapter (diffusers ``WanTransformer3DModel``, text-to-video ``WanPipeline``; Wan 2.1 and 2.2).

Masks in the stock model: none. ``WanPipeline`` zero-pads every caption to ``max_sequence_length`` and the model
attends to all of it (the padding rows are part of the model's computation), so every self- and
cross-attention call is already mask-free: ``dense-fp`` is the stock computation through safe-dit's processor.
The gain is scheduling.

safe-core: the token grid is the video's (latent frames, height, width) after the (t, h, w) patch, so PCSP
smooths in space and time. Sensitive rows enter where the patch embedder's tokens enter the first block, each
with its own rows of the 3-D rotary table (the ``rope`` module's per-token cos/sin, gathered once per
generation); self-attention runs their queries against every key (fresh sensitive rows written over the
anchor's K/V); cross-attention and the MLP run on those rows only; ``proj_out``'s rows are scattered over the
anchor's output before the stock unpatchify. PCSP reads the cross-attention (``attn2``) image->caption softmax,
its padding rows (exactly zero in the caption states the pipeline builds) and the closing ``</s>`` weighted 0.

``WanPipeline`` with ``transformer_2`` and ``boundary_ratio`` (Wan 2.2 A14B) switches transformers at a boundary
timestep: ``apply_safe_dit(pipe, config)`` patches both; the trajectory has one step plan; the partition found
during warm-up is kept across the switch; each transformer keeps its own caches (the outgoing one's are released
at the switch), so the first step of the incoming one is dense.

CFG: ``WanPipeline`` makes a conditional and then an unconditional call per step (``guidance_scale > 1``). Under
safe-core both calls follow one step plan and the prompt's partition (PCSP reads the conditional call), each with
its own caches; safe-sw hands the pipeline an unconditional prediction u' = (u (1 - gamma_i) + c (gamma_i - g)) /
(1 - g), so that its own u' + g (c - u') is the per-token guidance u + gamma_i (c - u).

``WanVideoToVideoPipeline`` (a text prompt over a noised input video, ``strength`` < 1) runs in every mode: it
starts at the scheduler's ``begin_index``, and the step plan covers the steps it runs.

Refused: image-to-video (``WanImageToVideoPipeline``, models with ``image_dim``/``added_kv_proj_dim``,
``encoder_hidden_states_image``) in every fast-path mode; per-token timesteps (Wan 2.2 TI2V,
``expand_timesteps=True``) in the scheduled modes and under context parallelism. VACE
(``WanVACETransformer3DModel``) and Animate are other model classes, which safe-dit has no adapter for.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel, _get_qkv_projections

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.config import SafeDitError
from safe_dit.engine.attend import attend, collect_text_probs
from safe_dit.engine.generation import gather_rows
from safe_dit.engine.guidance import SeparateCallGuidance, sensitivity_weighted
from safe_dit.engine.hooks import layer_of
from safe_dit.engine.schedule import SELECTIVE

HANDLE = "_safe_dit_handle"  # where safe_dit.api keeps a patched model's undo log

NOTES = ("Wan: no attention mask anywhere (captions are zero-padded to max_sequence_length and attended as they "
         "are): dense-fp is the stock computation; the gain is space-time scheduling.")

IMAGE_TO_VIDEO = ("safe-dit supports text-to-video Wan (WanPipeline) only: {what} is image-to-video conditioning "
                  "(WanImageToVideoPipeline). Run it stock (mode='dense'), or use a text-to-video Wan model")

PER_TOKEN_TIMESTEPS = ("safe-core and context_parallel on Wan need one timestep per sample: this call has per-token "
                       "timesteps (Wan 2.2 TI2V, WanPipeline(expand_timesteps=True)), whose per-token modulation "
                       "would not follow the sensitive or sharded rows. Use dense-fp on one device for this model")


class SafeWanAttnProcessor(SafeProcessor):
    """Drop-in for diffusers' ``WanAttnProcessor`` (text-to-video): same projections (fused or not), RMS norms across
    heads, 3-D RoPE and attention through diffusers' dispatcher; plus the SRSU K/V cache and the PCSP tap."""

    stock = WanAttnProcessor

    def setup(self, model) -> None:
        self.layer = layer_of(self.name, "blocks")
        self.is_self = self.name.split(".")[-1] == "attn1"
        self.captions: dict = {}  # this forward's raw caption states (set by the adapter's hooks), for PCSP

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if attn.add_k_proj is not None:
            raise SafeDitError(IMAGE_TO_VIDEO.format(what="a cross-attention with image keys (added_kv_proj_dim)"))
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)  # [B, L, H*d]
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norm across heads, per row
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, L, H, d]
        if rotary_emb is not None:  # cos, sin [1 or B, n, 1, d]: at selective steps the sensitive rows' own
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)

        gen = self.runtime.generation
        if gen is not None and self.is_self:
            if gen.kind == SELECTIVE:  # SRSU: sensitive rows attend to fresh + cached context K/V
                key, value = gen.merged_kv(self.layer, key, value)  # [B, N, H, d]
            elif gen.refreshes_cache:
                gen.store_kv(self.layer, key, value)
        elif gen is not None and gen.wants_probs(self.layer):  # PCSP, on its own small N x T softmax
            raw = self.captions.get("states")  # [B, T, Dtext] as the pipeline gave them: padding rows are zero
            valid = None if raw is None or raw.shape[1] != key.shape[1] else raw.abs().amax(-1) > 0  # [B, T]
            collect_text_probs(self.runtime, gen, query, key, valid)

        out = attend(self.runtime, self.name, query, key, value, attention_mask, None, rewrite=self.rewrite_padding,
                     stock_mask=lambda: attention_mask, processor=self, sequence=self.is_self)  # [B, Lq, H, d]
        out = out.flatten(2, 3).type_as(query)  # [B, Lq, H*d]
        return attn.to_out[1](attn.to_out[0](out))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's real-valued RoPE on x [B, L, H, d]: each interleaved pair (x1, x2) of channels turned by its angle
    (``cos``/``sin`` [., L, 1, d] hold every angle twice, as the rope module makes them)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, d/2] each
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def _image_to_video(pipe) -> bool:
    """``pipe`` is diffusers' image-to-video Wan pipeline (its conditioning frames are not what safe-dit verifies)."""
    try:
        from diffusers import WanImageToVideoPipeline
    except ImportError:
        return False
    return isinstance(pipe, WanImageToVideoPipeline)


def _argument(args, kwargs, name: str, position: int):
    return kwargs.get(name, args[position] if len(args) > position else None)


@register
class WanAdapter(Adapter):
    name = "wan"
    model_classes = (WanTransformer3DModel,)
    notes = NOTES
    processor = SafeWanAttnProcessor
    replaces = (WanAttnProcessor,)
    tokens_in = None  # the first block's pre-hook gathers the sensitive rows, the rope hook their RoPE rows
    tokens_out = "proj_out"  # before the unpatchify
    grid = None  # the config's (t, h, w) patch: the token grid is (latent frames, height, width) / patch
    special_trailing_tokens = 1  # UMT5 ends every caption with </s>
    cfg_pairs = True  # a [cond; uncond] batch under safe_dit.generation(..., cfg_batch=True)
    context_parallel = True  # the first block's tokens and the rope rows split, gathered after proj_out

    def parallel_hooks(self, model, runtime, parallel) -> list:
        def split_rope(_module, _inputs, out):  # (cos, sin) [1, N, 1, d] -> this rank's rows [1, N_local, 1, d]
            return tuple(parallel.shard(t, 1, "image tokens") for t in out)

        def split_tokens(_module, args, kwargs):  # the patch embedder's tokens [B, N, D] -> [B, N_local, D]
            x = kwargs.get("hidden_states", args[0] if args else None)
            if runtime.state is not None:
                runtime.state.global_tokens = x.shape[1]
            x = parallel.shard(x, 1, "image tokens")
            return (args, dict(kwargs, hidden_states=x)) if "hidden_states" in kwargs else ((x, *args[1:]), kwargs)

        return [model.rope.register_forward_hook(split_rope),
                model.blocks[0].register_forward_pre_hook(split_tokens, with_kwargs=True)]

    def check(self, model, config) -> None:
        if config.fast_path and (model.config.image_dim is not None or model.config.added_kv_proj_dim is not None):
            what = f"this {type(model).__name__} (image_dim / added_kv_proj_dim)"
            raise SafeDitError(IMAGE_TO_VIDEO.format(what=what))

    def attach(self, model, config, pipe=None):
        """Patch the pipeline's ``transformer`` and, where it has one (Wan 2.2), its ``transformer_2``: one trajectory,
        handed from one to the other at the boundary (see the module's docstring)."""
        if config.fast_path and _image_to_video(pipe):
            raise SafeDitError(IMAGE_TO_VIDEO.format(what=type(pipe).__name__))
        second = getattr(pipe, "transformer_2", None) if pipe is not None else None
        if second is not None and second is not model and getattr(second, HANDLE, None) is not None:
            raise SafeDitError("pipe.transformer_2 is patched on its own: remove_safe_dit(pipe.transformer_2), then "
                               "apply_safe_dit(pipe, config) patches both transformers")
        handle = super().attach(model, config, pipe)
        if second is None or second is model:
            return handle
        try:
            second_handle = super().attach(second, config, pipe)
        except BaseException:
            handle.remove()
            raise
        handle.on_remove(second_handle.remove)
        vars(second)[HANDLE] = second_handle  # runtime_of / is_safe_dit_applied see it; remove_safe_dit(pipe): both
        handle.on_remove(lambda: vars(second).pop(HANDLE, None))
        # the pipeline's patch is intact only while both transformers' processors are: a swap on transformer_2 makes
        # is_safe_dit_applied(pipe) false and apply_safe_dit(pipe, config) re-patch both
        handle.runtime.installed = handle.runtime.installed + second_handle.runtime.installed
        if config.scheduled:
            first, other = handle.runtime, second_handle.runtime
            handle.remove_hooks([model.register_forward_pre_hook(_take_over(first, other), prepend=True,
                                                                   with_kwargs=True),
                                 second.register_forward_pre_hook(_take_over(other, first), prepend=True,
                                                                    with_kwargs=True),
                                 model.register_forward_hook(_share_report(first, other)),
                                 second.register_forward_hook(_share_report(other, first))])
        return handle

    def guidance(self, model, runtime, handle):
        pipe = runtime.pipe

        def scale():  # the g WanPipeline applies to this transformer's steps
            if getattr(pipe, "transformer_2", None) is model and getattr(pipe.config, "boundary_ratio", None):
                return getattr(pipe, "_guidance_scale_2", None)  # WanPipeline keeps guidance_scale_2 there
            return getattr(pipe, "guidance_scale", None)

        separate = SeparateCallGuidance(scale)

        def guide(rt, gen, output):  # a [cond; uncond] batch (safe_dit.generation(..., cfg_batch=True)) or two calls
            return sensitivity_weighted(rt, gen, output) if gen.cfg_batch else separate(rt, gen, output)

        return guide

    def hooks(self, model, runtime, handle) -> list:
        captions: dict = {}
        for _, proc in runtime.installed:
            proc.captions = captions
        runtime.cfg_calls = True  # WanPipeline: a conditional, then an unconditional call per step

        def check(_model, args, kwargs):
            captions["states"] = _argument(args, kwargs, "encoder_hidden_states", 2)  # [B, T, Dtext]
            if _argument(args, kwargs, "encoder_hidden_states_image", 3) is not None:
                raise SafeDitError(IMAGE_TO_VIDEO.format(what="encoder_hidden_states_image"))
            timestep = _argument(args, kwargs, "timestep", 1)
            per_token = isinstance(timestep, torch.Tensor) and timestep.ndim == 2
            if per_token and (runtime.config.scheduled or runtime.parallel is not None):
                raise SafeDitError(PER_TOKEN_TIMESTEPS)
            return None

        def release(_model, _inputs, _output):
            captions.clear()  # no caption states kept past the forward

        hooks = [model.register_forward_pre_hook(check, with_kwargs=True),
                 model.register_forward_hook(release, always_call=True)]
        if not runtime.config.scheduled:
            return hooks

        def on_rope(_module, _inputs, out):  # (cos, sin) [1, N, 1, d]: the sensitive rows' own at selective steps
            gen = runtime.generation
            if gen is None or gen.kind != SELECTIVE:
                return None
            return gen.remember(("wan-rope", tuple(out[0].shape)),
                                lambda: tuple(gather_rows(t, gen.index) for t in out))  # [B, K, 1, d] each

        def into_blocks(_module, args, kwargs):  # the first block's input: the patch embedder's tokens [B, N, D]
            gen = runtime.generation
            if gen is None or gen.kind != SELECTIVE:
                return None
            if "hidden_states" in kwargs:
                return args, dict(kwargs, hidden_states=gen.gather(kwargs["hidden_states"]))
            return (gen.gather(args[0]), *args[1:]), kwargs  # [B, K, D]

        return hooks + [model.rope.register_forward_hook(on_rope),
                        model.blocks[0].register_forward_pre_hook(into_blocks, with_kwargs=True)]


def _take_over(mine, other):
    """Pre-hook (before the step tracker) on one of two transformers sharing a trajectory: at its first call after
    the other ran the previous step, it continues the other's generation (plan, position, partition; no caches) and
    the other's caches are released."""

    def hook(_model, _args, _kwargs):
        gen, scheduler = other.generation, getattr(mine.pipe, "scheduler", None)
        index = None if scheduler is None else scheduler.step_index
        if mine.explicit_generation or gen is None or index is None or gen.step != index - 1 \
                or gen.call + 1 < gen.calls_per_step:
            return None
        mine.generation = gen.continued()
        other.finish_generation()
        return None

    return hook


def _share_report(mine, other):
    """Post-hook (after the generation's release): the trajectory's report and partition on both transformers."""
    seen: dict = {}

    def hook(_model, _inputs, _output):
        if mine.generation is None and mine.last_report is not None and seen.get("report") is not mine.last_report:
            seen["report"] = mine.last_report
            other.last_report, other.last_sensitivity = mine.last_report, mine.last_sensitivity
            other.last_index, other.last_grid = mine.last_index, mine.last_grid

    return hook
