"""The FLOP count that GPU utilisation is quoted against equals torch's own counter."""

import numpy as np
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from tests.models import LARGE, TINY
from units.features.flops import front_end_frames, ssl_flops
from units.features.frames import SSL
from units.features.ssl import SSLExtractor, load_hf

FAMILIES = {
    "hubert": ("Hubert", TINY),
    "wav2vec2-large": ("Wav2Vec2", {**TINY, **LARGE}),
    "wavlm": ("WavLM", TINY),
    "data2vec-audio": (
        "Data2VecAudio",
        {k: v for k, v in TINY.items() if k != "num_conv_pos_embeddings"}
        | {"conv_pos_kernel_size": 5},
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, tmp_path_factory):
    name, options = FAMILIES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**options)
    getattr(transformers, f"{name}Model")(config).save_pretrained(directory)
    bundle = load_hf(directory)
    # Eager attention: torch's counter does not see the CPU kernel of scaled_dot_product.
    bundle.model.config._attn_implementation = "eager"
    return bundle


@pytest.mark.parametrize("samples", [400, 5431, 16000])
@pytest.mark.parametrize("layer", [1, 3])
def test_the_count_equals_torchs_flop_counter_over_the_layers_run(
    model, layer, samples, monkeypatch
):
    # FlopCounterMode breaks weight-normed convolutions under inference_mode (torch 2.13);
    # no_grad runs the same kernels.
    monkeypatch.setattr(torch, "inference_mode", torch.no_grad)
    extract = SSLExtractor(model, layer, window_seconds=None)
    wav = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
    with FlopCounterMode(display=False) as counter:
        extract([wav])
    assert ssl_flops(model.model, samples, layer) == counter.get_total_flops()
    assert front_end_frames(model.model, samples) == SSL.frames(samples)


def test_deeper_layers_cost_more_and_attention_grows_quadratically(model):
    one, two = ssl_flops(model.model, 16000, 1), ssl_flops(model.model, 16000, 2)
    three = ssl_flops(model.model, 16000, 3)
    assert one < two < three and three - two == two - one  # Identical blocks.
    short, long = (
        ssl_flops(model.model, n, 3) - ssl_flops(model.model, n, 2) for n in (16000, 32000)
    )
    assert long > 2 * short  # The scores' T^2 term.
