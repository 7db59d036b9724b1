"""Tiny random-initialised SSL models saved as local Hugging Face directories (no network)."""

from __future__ import annotations

import os

TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)

# wav2vec 2.0 / HuBERT "large": a layer-normalised conv front end and pre-norm blocks.
LARGE = dict(feat_extract_norm="layer", do_stable_layer_norm=True)


def save_tiny(directory: str | os.PathLike, family: str = "hubert", large: bool = False) -> str:
    """Saves a seeded 3-block ``hubert`` or ``wav2vec2`` of width 32 to ``directory``."""
    import torch
    import transformers

    config_cls, model_cls = {
        "hubert": ("HubertConfig", "HubertModel"),
        "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    }[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY, **(LARGE if large else {}))
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    return str(directory)
