"""Model FLOPs of an SSL layer's features: what a GPU's utilisation is measured against.

Counted as matrix work only (2 per multiply-add of every convolution, linear layer and
attention product), as model FLOPs utilisation is: the convolutional front end, the feature
projection, the positional convolution(s), and the transformer blocks up to the layer that
is read (the stage stops the forward pass there). Element-wise work (norms, activations,
softmax) is left out; it is a few percent and not what a GPU's peak is quoted for.

For a Hugging Face wav2vec 2.0 / HuBERT / WavLM / data2vec-audio module; the count equals
``torch.utils.flop_counter.FlopCounterMode`` over the same forward pass (the tests check it).
"""

from __future__ import annotations

import torch


def _conv_flops(conv: torch.nn.Conv1d, frames_in: int) -> tuple[int, int]:
    """(FLOPs, output frames) of one 1-D convolution over ``frames_in`` frames."""
    (kernel,), (stride,), (padding,) = conv.kernel_size, conv.stride, conv.padding
    frames = (frames_in + 2 * padding - kernel) // stride + 1
    per_frame = 2 * conv.out_channels * (conv.in_channels // conv.groups) * kernel
    return per_frame * max(frames, 0), max(frames, 0)


def _linear_flops(linear: torch.nn.Linear, rows: int) -> int:
    return 2 * linear.in_features * linear.out_features * rows


def front_end_frames(model: torch.nn.Module, num_samples: int) -> int:
    """Frames the convolutional front end makes of ``num_samples``."""
    frames = num_samples
    for layer in model.feature_extractor.conv_layers:
        frames = _conv_flops(layer.conv, frames)[1]
    return frames


def ssl_flops(model: torch.nn.Module, num_samples: int, layers: int) -> int:
    """FLOPs of one utterance of ``num_samples`` through ``model`` up to block ``layers``.

    Args:
        model: A Hugging Face SSL model (``SSLModel.model``).
        num_samples: The utterance's length (a padded batch: its padded length, per row).
        layers: Transformer blocks run (the layer read, counted from 1).
    """
    flops, frames = 0, num_samples
    for layer in model.feature_extractor.conv_layers:
        f, frames = _conv_flops(layer.conv, frames)
        flops += f
    flops += _linear_flops(model.feature_projection.projection, frames)
    positional = model.encoder.pos_conv_embed
    # One grouped convolution (wav2vec 2.0, HuBERT, WavLM) or a stack (data2vec-audio); each
    # keeps the frame count (same padding, its extra frame cut).
    for conv in (positional.conv,) if hasattr(positional, "conv") else [
        layer.conv for layer in positional.layers
    ]:  # fmt: skip
        flops += _conv_flops(conv, frames)[0]
    for block in model.encoder.layers[:layers]:
        attention = block.attention
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            flops += _linear_flops(getattr(attention, name), frames)
        width = attention.embed_dim
        flops += 2 * 2 * frames * frames * width  # Scores q.k, then the weighted sum of v.
        gate = getattr(attention, "gru_rel_pos_linear", None)
        if gate is not None:  # WavLM's gated relative position bias: per head and frame.
            flops += _linear_flops(gate, frames * attention.num_heads)
        ff = block.feed_forward
        flops += _linear_flops(ff.intermediate_dense, frames) + _linear_flops(
            ff.output_dense, frames
        )
    return flops
