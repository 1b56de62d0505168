"""Tiny random parts every backbone's kit shares: a word vocabulary and tokenizers built in code, a VAE,
CLIP and T5 text encoders, and prefix padding masks. Nothing here touches the hub."""

from __future__ import annotations

import torch

TINY_WORDS = (
    "<pad> <eos> <bos> <unk> a an the and red green blue yellow white black gray orange purple circle square "
    "triangle at in top bottom left right center middle on background of photo"
).split()


def word_tokenizer(template: str, max_length: int | None = None):
    """A word-level fast tokenizer over ``TINY_WORDS`` built in code (no hub): ``template`` places the
    special tokens around the words (``"<bos> $A"`` Gemma-like, ``"<bos> $A <eos>"`` CLIP-like, ``"$A <eos>"``
    T5-like); ``max_length`` becomes ``model_max_length``."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_WORDS)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [(t, vocab[t]) for t in ("<bos>", "<eos>") if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    extra = {} if max_length is None else {"model_max_length": max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", **extra)


def tiny_vae(latent_channels: int, seed: int = 0, **extra):
    """A seeded tiny random ``AutoencoderKL`` (two blocks of 8 and 16 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), norm_num_groups=8, sample_size=32, **extra,
    ).eval()


def tiny_clip(seed: int, hidden: int, projection: int | None = None):
    """A tiny random CLIP text encoder (with a text projection when ``projection`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(TINY_WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                         bos_token_id=TINY_WORDS.index("<bos>"), eos_token_id=TINY_WORDS.index("<eos>"),
                         pad_token_id=TINY_WORDS.index("<pad>"))
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def tiny_t5(seed: int, d_model: int):
    """A tiny random T5 encoder over ``TINY_WORDS``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(TINY_WORDS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=2, pad_token_id=TINY_WORDS.index("<pad>"),
                                   eos_token_id=TINY_WORDS.index("<eos>"))).eval()


def prefix_mask(valid: int, text_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A [1, text_len] int64 caption mask whose first ``valid`` tokens are real, the rest padding."""
    return torch.tensor([[1] * valid + [0] * (text_len - valid)]).to(device)
