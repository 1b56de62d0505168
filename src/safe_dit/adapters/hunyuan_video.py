"""HunyuanVideo adapter (diffusers ``HunyuanVideoTransformer3DModel``, ``HunyuanVideoPipeline``).

Masks in the stock model: the forward builds one [B, 1, 1, N + T] key mask over the joint [video; text] sequence,
valid up to N + (the sample's number of valid caption tokens), and passes it to every dual- and single-stream
block's ``HunyuanVideoAttnProcessor2_0``. It is key padding by construction (the same keys for every query): decided
once per forward on that object, dropped when all valid, else rewritten exactly (keys sliced to each sample's
valid prefix, the batch split by length). The token refiner's [B, 1, L, L] pair mask is the outer product of the
caption vector with its first column set (a padding token attends to the first caption token alone): checked once
per forward and rewritten exactly (``hunyuan_video15.SafeRefinerAttnProcessor``: valid rows as key padding, padding
rows the first token's value, which is what a softmax over one key gives).

safe-core: the joint sequence is [video; text] in both block kinds (the single-stream blocks concatenate it
themselves). Sensitive rows are gathered after ``x_embedder`` and scattered after ``proj_out``; each block rotates
them with their own rows of the 3-D RoPE table and writes them, with the always-computed text rows, into the
anchor's joint K/V in place. At a selective step the forward builds its mask over [K sensitive rows; text]; its
caption part is the same, so the keys [N; text] are masked by it. PCSP reads the video-query x caption-key block
of each sample's softmax over its valid keys (warm-up only).

Context parallelism: the video tokens are split after ``x_embedder`` with their rows of the RoPE table, so the
forward builds its key mask over this rank's rows and the caption; every rank holds the whole caption and runs the
token refiner locally. Each dual- and single-stream attention attends the caption keys locally (the mask's caption
part rewritten exactly, decided once per forward) and the video keys of every rank through the sequence-parallel
call, merged by log-sum-exp; PCSP normalises by that joint log-sum-exp and its top-K is global. Gathered after
``proj_out``. Refused under it: ``image_condition_type='token_replace'`` (its first-frame modulation is positional
in the unsplit sequence).

Guidance: HunyuanVideo is guidance-distilled (``guidance_scale`` is an embedding; one conditional call per step),
so ``safe-sw`` is refused. ``true_cfg_scale`` with a negative prompt makes a conditional, then an unconditional
call per step (the pipeline encodes the negative prompt only then): under safe-core both follow one step plan and
the prompt's partition, each with its own caches. Image-to-video models (``image_condition_type``: token
replacement of the first frame, latent concatenation) run under dense-fp only.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoTransformer3DModel,
)

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.adapters.hunyuan_video15 import (
    SafeRefinerAttnProcessor,
    _heads,
    collect_prefix,
    rotate_video,
    sharded_joint_attention,
    video_split_hooks,
)
from safe_dit.config import SafeDitError
from safe_dit.engine.attend import attend
from safe_dit.engine.hooks import caption_mask_check, layer_of
from safe_dit.engine.schedule import SELECTIVE

NOTES = ("HunyuanVideo: the forward builds one [B, 1, 1, N + T] key mask (valid up to N + the valid caption count) "
         "for every dual- and single-stream block: key padding by construction, decided once per forward, rewritten "
         "exactly (keys sliced, batch split by length). The token refiner's [B, 1, L, L] pair mask (an outer product, "
         "first column set) is checked once per forward and rewritten exactly.")

NO_SW_CFG = ("safe-sw is not available for HunyuanVideo: it is guidance-distilled (HunyuanVideoPipeline passes "
             "guidance_scale as an embedding and makes one conditional prediction per step), so there is no "
             "(eps_c - eps_u) to weight per token. Use mode='safe-core' or 'dense-fp'.")

IMAGE_TO_VIDEO = ("safe-core/safe-sw on HunyuanVideo support text-to-video only: this model is configured for "
                  "image-to-video (image_condition_type={kind!r}); it runs exactly under dense-fp")

TOKEN_REPLACE_CP = ("context_parallel on HunyuanVideo supports image_condition_type None or 'latent_concat': "
                    "'token_replace' modulates the first latent frame's tokens apart, by position in the unsplit "
                    "sequence. Run this image-to-video model on one device")

UNKNOWN_MASK = ("{where} got an attention mask of shape {shape}: safe-dit knows only the [B, 1, 1, N + T] key mask "
                "the HunyuanVideo forward hands every block. Run custom masks on the stock model (remove_safe_dit)")


class SafeHunyuanVideoAttnProcessor(SafeProcessor):
    """Drop-in for ``HunyuanVideoAttnProcessor2_0`` in the dual-stream (separate text projections) and single-stream
    (one projection over [video; text]) blocks: same projections, norms, RoPE on the video rows and [video; text]
    order; the key mask decided once per forward; SRSU; the PCSP tap."""

    stock = HunyuanVideoAttnProcessor2_0

    def setup(self, model) -> None:
        single = layer_of(self.name, "single_transformer_blocks")
        dual = layer_of(self.name, "transformer_blocks")
        self.layer = len(model.transformer_blocks) + single if single >= 0 else dual

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
        query, key, value = _heads(attn, x, attn.to_q, attn.to_k, attn.to_v)  # [B, L, H, d]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        gen = self.runtime.generation
        if image_rotary_emb is not None:
            if single:  # RoPE on the video rows only
                n = query.shape[1] - n_text
                q_video, k_video = rotate_video(query[:, :n], key[:, :n], image_rotary_emb, gen)
                query, key = torch.cat([q_video, query[:, n:]], dim=1), torch.cat([k_video, key[:, n:]], dim=1)
            else:
                query, key = rotate_video(query, key, image_rotary_emb, gen)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq, ek, ev = _heads(attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((query, eq), (key, ek), (value, ev)))
        mask = attention_mask  # [B, 1, 1, n + T] bool: the same object in every block of one forward
        batch = query.shape[0]
        if mask is not None and (mask.dim() != 4 or mask.shape[:3] != (batch, 1, 1) or mask.dtype != torch.bool
                                 or mask.shape[3] != query.shape[1] or mask.shape[3] < n_text):
            raise SafeDitError(UNKNOWN_MASK.format(where=self.name, shape=tuple(mask.shape)))
        text_valid = None if mask is None or not n_text else mask[:, 0, 0, -n_text:]  # [B, T]

        if gen is not None:
            if gen.kind == SELECTIVE:  # SRSU: fresh rows [sensitive video; text] over the anchor's joint K/V
                key, value = gen.merged_kv(self.name, key, value, gen.joint_rows(n_text, False),
                                           gen.joint_valid(n_text, False))  # [B, N + T, H, d]
            elif gen.refreshes_cache:
                gen.store_kv(self.name, key, value)
            if n_text and gen.wants_probs(self.layer) and self.runtime.parallel is None:
                collect_prefix(self.runtime, gen, query, key, n_text, text_valid)

        lk = key.shape[1]
        if self.runtime.parallel is not None:  # the caption on every rank, the video tokens sharded: the key mask's
            # caption part on the caption keys (the video keys are all valid by construction)
            compact = None if mask is None else (lambda m: m[:, 0, 0, m.shape[3] - n_text:])
            out = sharded_joint_attention(self, gen, query, key, value, n_text, mask, text_valid, compact,
                                          zero_padding_rows=False)
            return self._out(attn, out, n_text, query.dtype, encoder_hidden_states is None)

        def compact(m):  # [B, N + T]: every video key (valid by construction), then the mask's caption part
            return torch.cat([m.new_ones(batch, lk - n_text), m[:, 0, 0, m.shape[3] - n_text:]], dim=1)

        out = attend(self.runtime, self.name, query, key, value, mask, None, rewrite=self.rewrite_padding,
                     stock_mask=lambda: compact(mask)[:, None, None, :], compact=compact,
                     processor=self)  # [B, Lq, H, d]
        return self._out(attn, out, n_text, query.dtype, encoder_hidden_states is None)

    @staticmethod
    def _out(attn, out, n_text: int, dtype, no_text: bool):
        """[B, n + T, H, d] joint attention output -> (video, text) through the output projections, as stock."""
        out = out.flatten(2, 3).to(dtype)
        if no_text:
            return out, None
        video, text = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


def _make_processor(runtime, name, model, config):
    kind = SafeRefinerAttnProcessor if name.startswith("context_embedder.") else SafeHunyuanVideoAttnProcessor
    return kind(runtime, name, model, config)


POSITIONAL = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")


@register
class HunyuanVideoAdapter(Adapter):
    name = "hunyuan-video"
    model_classes = (HunyuanVideoTransformer3DModel,)
    notes = NOTES
    processor = staticmethod(_make_processor)
    replaces = (HunyuanVideoAttnProcessor2_0, AttnProcessor2_0)
    tokens_in = "x_embedder"
    tokens_out = "proj_out"
    cfg_pairs = False  # guidance-distilled: a batch of 2 is two prompts, never [cond; uncond]
    context_parallel = True  # video tokens split after x_embedder with their RoPE rows (the forward builds its key
    # mask over the local rows); the caption on every rank, its padding rewritten on the caption keys; gathered
    # after proj_out

    def parallel_hooks(self, model, runtime, parallel) -> list:
        return video_split_hooks(model, runtime, parallel)

    def token_grid(self, model):
        """(frames, h, w) of a [B, C, F, H, W] latent: the temporal and spatial patch sizes."""
        cfg = model.config
        return cfg.patch_size_t, cfg.patch_size, cfg.patch_size

    def check(self, model, config) -> None:
        if config.mode == "safe-sw":
            raise SafeDitError(NO_SW_CFG)
        if config.scheduled and model.config.image_condition_type is not None:
            raise SafeDitError(IMAGE_TO_VIDEO.format(kind=model.config.image_condition_type))
        if config.context_parallel is not None and model.config.image_condition_type == "token_replace":
            raise SafeDitError(TOKEN_REPLACE_CP)

    def hooks(self, model, runtime, handle) -> list:
        hooks = [model.register_forward_pre_hook(caption_mask_check("encoder_attention_mask", "encoder_hidden_states",
                                                                    POSITIONAL), with_kwargs=True)]
        pipe = runtime.pipe
        if not runtime.config.scheduled or pipe is None or not hasattr(pipe, "encode_prompt"):
            return hooks
        runtime.cfg_calls = True  # true CFG: a conditional, then an unconditional call per step
        encoded = [0]  # encode_prompt calls since the last pipeline call began
        original = pipe.encode_prompt

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):  # HunyuanVideoPipeline encodes a negative prompt only for true CFG
            encoded[0] += 1
            return original(*args, **kwargs)

        pipe.encode_prompt = encode_prompt

        def undo():
            if vars(pipe).get("encode_prompt") is encode_prompt:
                del pipe.encode_prompt

        handle.on_remove(undo)

        # first of all pre-hooks, so a forward refused by a later one (a step cache) still closes this call's count
        def true_cfg(_model, _args, _kwargs):  # at a pipeline call's first transformer call
            scheduler = getattr(pipe, "scheduler", None)
            if not runtime.explicit_generation and scheduler is not None and scheduler.step_index is None \
                    and encoded[0]:
                runtime.pipeline_cfg, encoded[0] = encoded[0] >= 2, 0

        return hooks + [model.register_forward_pre_hook(true_cfg, with_kwargs=True, prepend=True)]
