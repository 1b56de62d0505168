"""The embedded video model: a small text-to-video Wan transformer trained on the moving-shapes world.

Components, all offline:

* transformer: a diffusers ``WanTransformer3DModel`` (fp16 safetensors, ``weights/shapes-wan``) in pixel space
  (3 channels in and out, patch (1, 2, 2): 8 frames of 32x32 pixels are 8 x 16 x 16 = 2048 tokens), trained by
  ``safe_dit.embedded.train_video`` with rectified flow in the convention of diffusers'
  ``FlowMatchEulerDiscreteScheduler``: x_t = (1 - sigma) * video + sigma * noise at timestep 1000 * sigma, the
  model predicts noise - video;
* text encoder: all-MiniLM-L6-v2, as for the image models (:func:`safe_dit.embedded.model.load_text_encoder`);
  WanPipeline takes its last hidden state, cut at the prompt's length and zero-padded to
  ``max_sequence_length`` tokens (``TEXT_TOKENS``; ``text_dim`` 384 is a Wan config field);
* "VAE": the identity on [-1, 1] videos (temporal and spatial scale factor 1, zero mean, unit std).

The pipeline is diffusers' own ``WanPipeline`` (its ``__call__`` unchanged): the subclass only says that one
latent frame is one video frame and one latent pixel one pixel (see :class:`PixelWanPipeline`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.video_processor import VideoProcessor

from safe_dit.config import SafeDitError
from safe_dit.embedded import video_world
from safe_dit.embedded.model import TEXT_DIM, file_sha256, load_text_encoder

VIDEO_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "shapes-wan"
#: Text tokens the transformer attends to (WanPipeline's ``max_sequence_length``): every caption of the world
#: fits (tests/embedded/test_video_model.py checks it), the rest are zeros, as WanPipeline pads.
TEXT_TOKENS = 40
#: FlowMatchEulerDiscreteScheduler ``shift`` the pipeline samples with.
SCHEDULER_SHIFT = 3.0

#: Architecture of the embedded video transformer (``safe_dit.embedded.train_video`` builds it from this).
VIDEO_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=3, out_channels=3,
    text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


class PixelVideoVAE(ModelMixin, ConfigMixin):
    """Identity "autoencoder" for [B, 3, F, H, W] videos in [-1, 1], with the config fields WanPipeline reads."""

    @register_to_config
    def __init__(self, z_dim: int = 3, scale_factor_temporal: int = 1, scale_factor_spatial: int = 1,
                 latents_mean: tuple = (0.0, 0.0, 0.0), latents_std: tuple = (1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # gives the module a device/dtype

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        return videos

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        out = latents.clamp(-1, 1)
        return DecoderOutput(sample=out) if return_dict else (out,)


class _DropFrameRounding(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "has to be divisible by 1" not in record.getMessage()


class PixelWanPipeline(WanPipeline):
    """diffusers' WanPipeline on a pixel-space transformer: temporal and spatial scale factors of 1.

    WanPipeline asks for ``num_frames = k * temporal_factor + 1`` and otherwise rounds to it; with a factor of 1
    every count is such a number, yet its test (``num_frames % 1 != 1``) rounds every count up by one frame. So
    :meth:`prepare_latents` takes the frame count before that rounding (one less than it receives), and the
    pipeline's warning about it is filtered: ``num_frames=8`` draws 8 frames. Everything else is stock."""

    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 boundary_ratio=None, expand_timesteps=False):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                         transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
                         expand_timesteps=expand_timesteps)
        self.vae_scale_factor_temporal = 1
        self.vae_scale_factor_spatial = 1
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    def prepare_latents(self, batch_size, num_channels_latents=3, height=video_world.FRAME_SIZE,
                        width=video_world.FRAME_SIZE, num_frames=video_world.NUM_FRAMES + 1, dtype=None,
                        device=None, generator=None, latents=None):
        return super().prepare_latents(batch_size, num_channels_latents, height, width, num_frames - 1, dtype,
                                       device, generator, latents)

    def __call__(self, *args, height: int = video_world.FRAME_SIZE, width: int = video_world.FRAME_SIZE,
                 num_frames: int = video_world.NUM_FRAMES, max_sequence_length: int = TEXT_TOKENS, **kwargs):
        if num_frames < 1:
            raise SafeDitError(f"num_frames must be at least 1, got {num_frames}")
        log = logging.getLogger("diffusers.pipelines.wan.pipeline_wan")
        drop = _DropFrameRounding()
        log.addFilter(drop)
        try:
            return super().__call__(*args, height=height, width=width, num_frames=num_frames,
                                    max_sequence_length=max_sequence_length, **kwargs)
        finally:
            log.removeFilter(drop)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int = TEXT_TOKENS):
    """Text states exactly as WanPipeline computes them (``_get_t5_prompt_embeds``): the last hidden state over
    the prompt padded to ``max_sequence_length``, cut at the prompt's length and zero-padded back."""
    inputs = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = inputs.attention_mask
    with torch.no_grad():
        states = text_encoder(inputs.input_ids, mask).last_hidden_state
    lengths = mask.gt(0).sum(dim=1)
    keep = torch.arange(max_sequence_length)[None, :] < lengths[:, None]
    return states * keep[..., None].to(states.dtype)


def build_video_transformer(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**dict(VIDEO_TRANSFORMER_CONFIG, **overrides))


def build_video_pipeline(transformer: WanTransformer3DModel, dtype: torch.dtype = torch.float32,
                         shift: float = SCHEDULER_SHIFT) -> PixelWanPipeline:
    tokenizer, text_encoder = load_text_encoder(dtype)
    return PixelWanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=PixelVideoVAE(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        transformer=(transformer if transformer.dtype == dtype else transformer.to(dtype)).eval(),
    )


def load_video_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> PixelWanPipeline:
    """The embedded moving-shapes Wan model as a ready WanPipeline (fp16 weights upcast to ``dtype``): the
    checkpoint directory ``path``, else the one shipped in the package."""
    path = Path(path) if path is not None else VIDEO_WEIGHTS_DIR
    if not (path / "config.json").is_file():
        raise SafeDitError(
            f"no trained video transformer at {path}: the embedded video model is not in this install; "
            "give a checkpoint of `python scripts/train_video_model.py` (its --out directory)")
    transformer = WanTransformer3DModel.from_pretrained(path, dtype=dtype)
    return build_video_pipeline(transformer, dtype)


def video_model_card(path: str | Path | None = None) -> dict:
    card = Path(path or VIDEO_WEIGHTS_DIR) / "training.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def video_weights_identity(path: str | Path | None = None) -> dict:
    """Which trained video weights a measurement used: the directory, the safetensors' sha256, the steps."""
    path = Path(path) if path is not None else VIDEO_WEIGHTS_DIR
    return {"path": "embedded video" if path == VIDEO_WEIGHTS_DIR else str(path),
            "sha256": file_sha256(path / "diffusion_pytorch_model.safetensors"),
            "steps": video_model_card(path).get("steps")}


def frames_uint8(output) -> list:
    """The pipeline's ``output_type="np"`` frames ([B, F, H, W, 3] floats in [0, 1]) as uint8 arrays [F, H, W, 3]."""
    import numpy as np

    frames = np.asarray(output.frames if hasattr(output, "frames") else output)
    return [np.clip(v * 255.0 + 0.5, 0, 255).astype(np.uint8) for v in frames]
