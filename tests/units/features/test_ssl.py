"""SSL layer extraction on tiny, randomly initialised models of the four families.

Each family is built small (hidden 32, 3 blocks, 2 heads, conv_dim 16 with the standard
kernels and strides, so the 400/320 frame contract holds), in its base variant (group-norm
front end, post-LN encoder) and its large variant (layer-norm front end, pre-LN "stable"
encoder); data2vec-audio has one variant (layer-norm front end, post-LN, stacked positional
convolutions). Tolerances, measured on these models (outputs of magnitude 0.3 to 4):

- saved and loaded back: bitwise equal;
- batched vs one at a time: max abs difference 3e-7 to 3.7e-6 (asserted < 2e-5), for
  equal-length batches (group norm, data2vec) and padded batches with attention masks
  (layer norm);
- windowed (0.4 s cores, 0.5 s context, 3 s of audio) vs whole, relative Frobenius error:
  layer-norm front ends 0.0014 to 0.035 (asserted < 0.1; 0.09 to 0.11 without context),
  from attention seeing less audio; group-norm front ends 0.22 to 0.23 (asserted < 0.5;
  0.27 to 0.28 without context), dominated by the group norm's per-window statistics
  (random weights, 0.4 s windows of a chirp; real models with 40 s windows fare far
  better). With attention switched off, windowed equals whole to 3e-6 (asserted 1e-5),
  which pins the frame bookkeeping down exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from units.features.frames import SSL  # noqa: E402
from units.features.ssl import (  # noqa: E402
    WEIGHT_ALIGNMENT,
    ModelLoadError,
    SSLExtractor,
    SSLModel,
    align_weights,
    layer_norm_waveform,
    load_hf,
    plan_windows,
)

LAYERS = 3
COMMON = dict(
    hidden_size=32,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16,) * 7,
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    layerdrop=0.0,
)
BASE = dict(feat_extract_norm="group", do_stable_layer_norm=False)
LARGE = dict(feat_extract_norm="layer", do_stable_layer_norm=True)
VARIANTS = {
    "hubert-base": ("HubertConfig", "HubertModel", BASE),
    "hubert-large": ("HubertConfig", "HubertModel", LARGE),
    "wav2vec2-base": ("Wav2Vec2Config", "Wav2Vec2Model", BASE),
    "wav2vec2-large": ("Wav2Vec2Config", "Wav2Vec2Model", LARGE),
    "wavlm-base": ("WavLMConfig", "WavLMModel", BASE),
    "wavlm-large": ("WavLMConfig", "WavLMModel", LARGE),
    # Two stacked positional convolutions of kernel 5 (data2vec's default is 5 of 19).
    "data2vec-audio": (
        "Data2VecAudioConfig",
        "Data2VecAudioModel",
        dict(num_conv_pos_embeddings=2, conv_pos_kernel_size=5),
    ),
}
GROUP_NORM = [n for n in VARIANTS if n.endswith("-base")]
LAYER_NORM = [n for n in VARIANTS if n not in GROUP_NORM]
# Lengths with repeats, so equal-length batching has something to batch.
LENGTHS = [400, 2345, 8000, 8000, 12345, 16000, 16000, 23456]


def chirp(n: int, seed: int = 0) -> np.ndarray:
    """A rising tone plus a little seeded noise (local generator, global RNG untouched)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.5 * t)) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


def build(name: str):
    config_cls, model_cls, extra = VARIANTS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    return getattr(transformers, model_cls)(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (in-memory model, directory it was saved to)."""
    out = {}
    for name in VARIANTS:
        model = build(name)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = (model, str(directory))
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {name: load_hf(directory) for name, (_, directory) in saved.items()}


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) if x.size else 0.0 for x, y in zip(a, b, strict=True))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- loading ---------------------------------------------------------------------------


def test_align_weights_moves_only_misaligned_tensors_and_keeps_their_bits():
    layer = torch.nn.Linear(7, 5)
    storage = torch.randn(64)
    # A weight four bytes past a 64-byte boundary, as a slice of a mapped file can be.
    layer.weight.data = storage[1:36].view(5, 7)
    expected = layer.weight.detach().clone()
    bias_at = layer.bias.data_ptr()
    assert layer.weight.data_ptr() % WEIGHT_ALIGNMENT != 0
    assert align_weights(layer) == 1
    assert layer.weight.data_ptr() % WEIGHT_ALIGNMENT == 0
    assert torch.equal(layer.weight, expected) and layer.weight.is_contiguous()
    assert layer.bias.data_ptr() == bias_at  # Already aligned: not copied.
    assert align_weights(layer) == 0


@pytest.mark.parametrize("name", VARIANTS)
def test_loaded_model_matches_the_in_memory_one(name, saved, loaded):
    model, directory = saved[name]
    bundle = loaded[name]
    config = model.config
    assert bundle.architecture == config.model_type
    assert bundle.num_layers == LAYERS and bundle.hidden_size == 32
    assert bundle.group_norm == (name in GROUP_NORM)
    assert bundle.stable_layer_norm == name.endswith("-large")
    assert not bundle.model.training
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        assert bundle.sha256 == hashlib.sha256(f.read()).hexdigest()

    memory = SSLModel.from_transformers(model, path=directory, sha256=bundle.sha256)
    # The same weights, bit for bit, each in torch's own 64-byte-aligned storage: MKL picks
    # kernels by operand alignment, and the file's tensors sit at the offsets its header
    # gives (an AMD CPU computed other bits from them, up to 4.8e-7, before the loader
    # moved them).
    loaded_weights = dict(bundle.model.state_dict())
    for key, tensor in memory.model.state_dict().items():
        assert torch.equal(loaded_weights[key], tensor), key
        assert loaded_weights[key].data_ptr() % WEIGHT_ALIGNMENT == 0, key
    # Same process, same weights at the same alignment, same inputs: the determinism
    # contract promises the same bits on any machine.
    wavs = [chirp(n, i) for i, n in enumerate(LENGTHS)]
    for layer in (1, LAYERS):
        got = SSLExtractor(bundle, layer)(wavs)
        want = SSLExtractor(memory, layer)(wavs)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)

    spec = SSLExtractor(bundle, 2).spec
    assert (spec.extractor, spec.dim, spec.window, spec.hop, spec.layer) == ("hf", 32, 400, 320, 2)
    assert spec.checkpoint == directory and spec.checkpoint_sha256 == bundle.sha256
    assert spec.architecture == config.model_type
    assert spec.normalize_waveform == bundle.normalize_waveform
    assert spec.frame_rate == 50.0


# --- layer numbering -------------------------------------------------------------------


def _manual_blocks(model, wav: np.ndarray, layer: int) -> torch.Tensor:
    """Block ``layer``'s output computed by hand: front end, positional conv, blocks."""
    x = torch.from_numpy(wav)[None]
    h = model.feature_extractor(x).transpose(1, 2)
    h = model.feature_projection(h)
    h = h[0] if isinstance(h, tuple) else h  # HuBERT returns one tensor, the others two.
    encoder = model.encoder
    h = h + encoder.pos_conv_embed(h)
    if not getattr(model.config, "do_stable_layer_norm", False):
        h = encoder.layer_norm(h)  # Post-LN encoders normalise before the blocks.
    position_bias = None
    for block in encoder.layers[:layer]:
        if model.config.model_type == "wavlm":
            h, position_bias = block(h, position_bias=position_bias)
        else:
            h = block(h)
    return h[0]


@pytest.mark.parametrize("name", VARIANTS)
def test_layer_is_block_output_counted_from_one(name, loaded):
    bundle = loaded[name]
    model = bundle.model
    wav = chirp(12345)
    x = torch.from_numpy(layer_norm_waveform(wav) if bundle.normalize_waveform else wav)
    with torch.inference_mode():
        out = model(x[None], output_hidden_states=True)
        for layer in range(1, LAYERS + 1):
            got = SSLExtractor(bundle, layer)([wav])[0]
            want = _manual_blocks(model, x.numpy(), layer).numpy()
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            if not bundle.stable_layer_norm:
                # Post-LN: hidden_states[L] is block L's output, as in fairseq.
                np.testing.assert_allclose(got, out.hidden_states[layer][0], atol=1e-5, rtol=0)
        if bundle.stable_layer_norm:
            # Pre-LN: fairseq's output_layer=N skips the encoder's final layer norm, which
            # transformers' last_hidden_state has.
            last = SSLExtractor(bundle, LAYERS)([wav])[0]
            assert np.abs(last - out.last_hidden_state[0].numpy()).max() > 0.1
            normed = model.encoder.layer_norm(torch.from_numpy(last)).numpy()
            np.testing.assert_allclose(normed, out.last_hidden_state[0], atol=1e-5, rtol=0)


def _block_calls(bundle, run):
    """``run()``'s result, and how many times each transformer block ran during it."""
    calls = [0] * LAYERS

    def counter(i):
        def hook(_module, _args):
            calls[i] += 1

        return hook

    layers = bundle.model.encoder.layers
    handles = [b.register_forward_pre_hook(counter(i)) for i, b in enumerate(layers)]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, calls


@pytest.mark.parametrize("name", ["hubert-base", "wavlm-large"])
def test_blocks_after_the_layer_do_not_run(name, loaded):
    bundle = loaded[name]
    _, calls = _block_calls(bundle, lambda: SSLExtractor(bundle, 1)([chirp(8000)]))
    assert calls == [1, 0, 0]
    # The hook is gone after the call: a plain forward runs every block.
    with torch.inference_mode():
        out = bundle.model(torch.from_numpy(chirp(8000))[None])
    assert out.last_hidden_state.shape == (1, SSL.frames(8000), 32)


@pytest.mark.parametrize("name", ["hubert-base", "wavlm-large"])
def test_several_layers_from_one_forward_equal_each_layers_own_extractor(name, loaded):
    """Block L's output does not depend on the blocks after it: the layers of one pass are
    each layer's own extractor's features, bit for bit, and no block runs twice."""
    bundle = loaded[name]
    wavs = [chirp(n, i) for i, n in enumerate((8000, 5000, 12345))]
    extract = SSLExtractor(bundle, 1, extra_layers=(2,))
    together, calls = _block_calls(bundle, lambda: extract.layers_on_device(wavs, host=True))
    assert sorted(together) == [1, 2]
    batches = calls[0]
    assert batches >= 1 and calls == [batches, batches, 0]  # Up to block 2, once per batch.
    for layer in (1, 2):
        alone = SSLExtractor(bundle, layer)(wavs)
        for got, want in zip(together[layer], alone, strict=True):
            assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("layer", [0, LAYERS + 1, -1])
def test_layer_out_of_range_is_a_clear_error(layer, loaded):
    with pytest.raises(ValueError, match=rf"1\.\.{LAYERS}"):
        SSLExtractor(loaded["hubert-base"], layer)


# --- frames ----------------------------------------------------------------------------

BOUNDARY_LENGTHS = [0, 1, 399, 400, 401, 719, 720, 721, 1039, 1040, 1041, 1359, 1360, 16000]


@pytest.mark.parametrize("name", ["hubert-base", "wav2vec2-large", "data2vec-audio"])
@pytest.mark.parametrize("window_seconds", [None, 0.05])
def test_frame_counts_follow_the_contract(name, window_seconds, loaded):
    extract = SSLExtractor(
        loaded[name], 2, window_seconds=window_seconds, context_seconds=0.02, batch_seconds=5
    )
    feats = extract([chirp(n, n) for n in BOUNDARY_LENGTHS])
    for n, f in zip(BOUNDARY_LENGTHS, feats, strict=True):
        assert f.shape == (SSL.frames(n), 32), n
        assert f.dtype == np.float32
        assert np.isfinite(f).all()
    assert [f.shape[0] for f in feats] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 49]


def test_plan_windows_tiles_every_frame_once():
    for n in [400, 719, 720, 5000, 16000, 16001, 33333]:
        total = SSL.frames(n)
        for core in [1, 2, 5, 7]:
            for context in [0, 1, 3]:
                kept = []
                for start, stop, keep_from, keep_to, out_from in plan_windows(n, core, context):
                    assert start % SSL.hop == 0 and 0 <= start < stop <= n
                    local = SSL.frames(stop - start)
                    assert 0 <= keep_from <= context and 0 <= local - keep_to <= context
                    assert out_from == start // SSL.hop + keep_from  # Local j = global a + j.
                    kept.extend(range(out_from, out_from + keep_to - keep_from))
                assert kept == list(range(total)), (n, core, context)
    assert plan_windows(16000, 100, 5) == [(0, 16000, 0, 49, 0)]  # Short enough: whole.
    assert plan_windows(399, 2, 1) == []


# --- batching --------------------------------------------------------------------------


def _forward_shapes(bundle: SSLModel) -> tuple[list, object]:
    shapes: list = []
    handle = bundle.model.feature_extractor.register_forward_pre_hook(
        lambda _m, args: shapes.append(tuple(args[0].shape))
    )
    return shapes, handle


@pytest.mark.parametrize("name", VARIANTS)
def test_batched_equals_one_at_a_time(name, loaded):
    bundle = loaded[name]
    wavs = [chirp(n, i) for i, n in enumerate(LENGTHS)]
    one = [SSLExtractor(bundle, 2, window_seconds=None)([w])[0] for w in wavs]
    shapes, handle = _forward_shapes(bundle)
    try:
        batched = SSLExtractor(bundle, 2, window_seconds=None, batch_seconds=100)(wavs)
    finally:
        handle.remove()
    assert _max_diff(batched, one) < 2e-5
    if bundle.padding_invariant:
        assert shapes == [(len(wavs), max(LENGTHS))]  # One padded batch, attention-masked.
    else:
        # Group norm / stacked positional convs: equal lengths only, never padded.
        assert sorted(shapes) == sorted((LENGTHS.count(n), n) for n in set(LENGTHS))


def test_batches_stay_within_the_budget(loaded):
    bundle = loaded["wav2vec2-large"]
    wavs = [chirp(n, i) for i, n in enumerate(LENGTHS * 3)]
    shapes, handle = _forward_shapes(bundle)
    extract = SSLExtractor(bundle, 1, batch_seconds=2.0, window_seconds=None)
    try:
        extract(wavs)
    finally:
        handle.remove()
    assert sum(b for b, _ in shapes) == len(wavs)
    assert all(b * n <= 32000 or b == 1 for b, n in shapes)
    assert len(shapes) < len(wavs)
    # The padding is counted: samples run are the batches' shapes, the audio the lengths.
    assert extract.samples_run == sum(b * n for b, n in shapes)
    assert extract.samples_audio == sum(map(len, wavs))
    assert extract.padding_fraction == 1 - sum(map(len, wavs)) / sum(b * n for b, n in shapes)


def test_padding_leaks_into_data2vec_but_not_wav2vec2_large(loaded):
    """Why data2vec batches equal lengths only: raw transformers, padded with a mask."""

    def padded_vs_alone(bundle):
        short, long = chirp(8000, 1), chirp(16000, 2)
        batch = np.zeros((2, 16000), np.float32)
        batch[0, :8000], batch[1] = short, long
        mask = np.zeros((2, 16000), np.int64)
        mask[0, :8000], mask[1] = 1, 1
        with torch.inference_mode():
            padded = bundle.model(
                torch.from_numpy(batch), attention_mask=torch.from_numpy(mask)
            ).last_hidden_state[0, : SSL.frames(8000)]
            alone = bundle.model(torch.from_numpy(short)[None]).last_hidden_state[0]
        return float((padded - alone).abs().max())

    assert padded_vs_alone(loaded["data2vec-audio"]) > 1e-3
    assert padded_vs_alone(loaded["wav2vec2-large"]) < 2e-5
    assert not loaded["data2vec-audio"].padding_invariant
    assert loaded["wav2vec2-large"].padding_invariant

    # HuBERT's conv_pos_batch_norm variant: a trained batch norm before the positional conv
    # turns padded zeros into its bias, which the conv then spreads into real frames.
    torch.manual_seed(0)
    config = transformers.HubertConfig(**{**COMMON, **LARGE, "conv_pos_batch_norm": True})
    model = transformers.HubertModel(config).eval()
    model.encoder.pos_conv_embed.batch_norm.running_mean.uniform_(-1, 1)
    bundle = SSLModel.from_transformers(model, path="hubert-bn", sha256="-")
    assert padded_vs_alone(bundle) > 1e-3
    assert not bundle.padding_invariant


# --- windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_windowed_is_close_to_whole(name, loaded):
    bundle = loaded[name]
    wav = chirp(48000, 9)  # 3 s: 0.4 s cores (20 frames), 8 windows.
    whole = SSLExtractor(bundle, LAYERS, window_seconds=None)([wav])[0]

    def windowed(context):
        return SSLExtractor(bundle, LAYERS, window_seconds=0.4, context_seconds=context)([wav])[0]

    with_context, without = windowed(0.5), windowed(0.0)
    assert with_context.shape == whole.shape == (SSL.frames(48000), 32)
    bound = 0.5 if bundle.group_norm else 0.1
    assert _rel(with_context, whole) < bound
    assert _rel(with_context, whole) < _rel(without, whole)  # Context helps.


def _without_attention(bundle: SSLModel) -> SSLModel:
    """A copy whose attention outputs are zero: frames only interact through convolutions."""
    model = build_like(bundle)
    with torch.no_grad():
        for block in model.encoder.layers:
            block.attention.out_proj.weight.zero_()
            block.attention.out_proj.bias.zero_()
    return dataclasses.replace(bundle, model=model)


def build_like(bundle: SSLModel):
    model = type(bundle.model)(bundle.model.config).eval()
    model.load_state_dict(bundle.model.state_dict())
    return model


@pytest.mark.parametrize("name", LAYER_NORM)
def test_windows_map_exactly_onto_global_frames(name, loaded):
    """With attention off, only the positional conv (reach 4 frames) crosses frames.

    So windows with at least that much context give the whole-utterance result exactly:
    any off-by-one in cutting, keeping or stitching would show. Without context, the frames
    next to window edges differ.
    """
    bundle = _without_attention(loaded[name])
    wav = chirp(23456, 3)
    whole = SSLExtractor(bundle, LAYERS, window_seconds=None)([wav])[0]
    for window in (0.02, 0.05, 0.13):
        got = SSLExtractor(bundle, LAYERS, window_seconds=window, context_seconds=0.1)([wav])[0]
        np.testing.assert_allclose(got, whole, atol=1e-5, rtol=0)
    edges = SSLExtractor(bundle, LAYERS, window_seconds=0.13, context_seconds=0.0)([wav])[0]
    assert np.abs(edges - whole).max() > 1e-3


# --- waveform normalisation ------------------------------------------------------------


def _with_preprocessor(src: str, dst, do_normalize: bool) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "preprocessor_config.json"), "w") as f:
        json.dump(
            {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": do_normalize}, f
        )
    return str(dst)


def test_normalize_follows_preprocessor_config_then_front_end(saved, loaded, tmp_path):
    # No preprocessor_config.json: layer-norm front ends normalise (fairseq normalize=True).
    assert {n: b.normalize_waveform for n, b in loaded.items()} == {
        n: n not in GROUP_NORM for n in VARIANTS
    }
    on = load_hf(_with_preprocessor(saved["hubert-base"][1], tmp_path / "on", True))
    off = load_hf(_with_preprocessor(saved["wav2vec2-large"][1], tmp_path / "off", False))
    assert on.normalize_waveform and not off.normalize_waveform
    assert SSLExtractor(on, 1).spec.normalize_waveform
    assert not SSLExtractor(off, 1).spec.normalize_waveform


@pytest.mark.parametrize("name", ["hubert-base", "wav2vec2-large"])
def test_normalisation_is_over_the_whole_utterance(name, loaded):
    bundle = loaded[name]
    on = dataclasses.replace(bundle, normalize_waveform=True)
    off = dataclasses.replace(bundle, normalize_waveform=False)
    wav = chirp(23456, 5)
    wav[:8000] *= 0.05  # Quiet then loud: per-window statistics would differ a lot.
    for window in (None, 0.13):
        kw = dict(window_seconds=window, context_seconds=0.1)
        normed = SSLExtractor(on, 2, **kw)([wav, 3 * wav + 0.1])
        prenormed = SSLExtractor(off, 2, **kw)([layer_norm_waveform(wav)])[0]
        np.testing.assert_allclose(normed[0], prenormed, atol=2e-5, rtol=0)
        np.testing.assert_allclose(normed[1], normed[0], atol=1e-4, rtol=0)  # Gain/offset-free.
        if not bundle.group_norm:
            # A group-norm front end (no conv bias) is itself nearly gain/offset-free, so
            # only a layer-norm one shows that "off" really leaves the waveform alone.
            raw = SSLExtractor(off, 2, **kw)([wav, 3 * wav + 0.1])
            assert np.abs(raw[1] - raw[0]).max() > 1e-2
    x = layer_norm_waveform(wav)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3


def test_from_fairseq_bundles_with_the_fairseq_source(saved, loaded):
    from units.features.ssl import from_fairseq

    model, directory = saved["wav2vec2-large"]
    bundle = from_fairseq(model, path="/ckpt/w2v_large.pt", sha256="abc", normalize_waveform=True)
    spec = SSLExtractor(bundle, 2).spec
    assert (spec.extractor, spec.checkpoint, spec.checkpoint_sha256) == (
        "fairseq",
        "/ckpt/w2v_large.pt",
        "abc",
    )
    assert from_fairseq(loaded["hubert-base"]).source == "fairseq"
    # What units.features.fairseq_checkpoint.load_fairseq returns (its FairseqModel's fields).
    fm = types.SimpleNamespace(model=model, path="/ckpt/x.pt", sha256="d", normalize_waveform=False)
    bundle = from_fairseq(fm)
    assert (bundle.source, bundle.path, bundle.sha256) == ("fairseq", "/ckpt/x.pt", "d")
    assert not bundle.normalize_waveform  # The checkpoint's flag wins over the front end's.
    with pytest.raises(ModelLoadError, match="path and sha256"):
        from_fairseq(model)


# --- errors ----------------------------------------------------------------------------


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf(tmp_path / "nope")
    checkpoint = tmp_path / "hubert_base_ls960.pt"
    checkpoint.write_bytes(b"not a directory")
    with pytest.raises(ModelLoadError, match="fairseq"):
        load_hf(checkpoint)


def test_directory_without_config_or_weights(saved, tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf(tmp_path)
    shutil.copy(os.path.join(saved["hubert-base"][1], "config.json"), tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_hf(tmp_path)


def test_corrupt_weights(saved, tmp_path):
    directory = shutil.copytree(saved["hubert-base"][1], tmp_path / "m")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # Truncated download.
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_hf(directory)
    weights.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_hf(directory)


def test_weights_that_do_not_fit_the_config(saved, tmp_path):
    directory = shutil.copytree(saved["hubert-base"][1], tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS + 1  # Block 4 would be left random.
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="missing"):
        load_hf(directory)


@pytest.mark.parametrize("model_type", ["bert", "whisper", None])
def test_unknown_architecture(model_type, tmp_path):
    config = {"model_type": model_type} if model_type else {"hidden_size": 32}
    if model_type == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_hf(tmp_path)


def test_bad_arguments(loaded):
    bundle = loaded["hubert-base"]
    with pytest.raises(ValueError, match="CUDA only"):
        SSLExtractor(bundle, 1, dtype="bf16")
    with pytest.raises(ValueError, match="dtype"):
        SSLExtractor(bundle, 1, dtype="int8")
    with pytest.raises(ValueError, match="int"):
        SSLExtractor(bundle, 1.0)
    with pytest.raises(ValueError, match="mono"):
        SSLExtractor(bundle, 1)([np.zeros((2, 800), np.float32)])
    assert SSLExtractor(bundle, 1)([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_cuda_matches_cpu(dtype, saved):
    wavs = [chirp(n, i) for i, n in enumerate(LENGTHS)]
    cpu = SSLExtractor(load_hf(saved["wav2vec2-large"][1]), 2)(wavs)
    gpu_model = load_hf(saved["wav2vec2-large"][1], device="cuda")
    gpu = SSLExtractor(gpu_model, 2, device="cuda", dtype=dtype)(wavs)
    assert _max_diff(gpu, cpu) < (1e-3 if dtype is None else 0.1)


def test_a_hub_id_resolves_from_the_local_cache_only_and_says_how_to_fill_it(tmp_path, monkeypatch):
    """``hf:ORG/NAME`` finds the model in the Hugging Face cache, offline, with the spec of
    its directory and the hub id as its name; an id not there says how to download it."""
    import huggingface_hub.constants

    from tests.models import save_tiny
    from units.features.ssl import ModelLoadError, describe_hf, resolve_hf

    cache = tmp_path / "hub"
    snapshot = cache / "models--unitpipe--tiny-hubert" / "snapshots" / ("0" * 40)
    save_tiny(snapshot)
    (cache / "models--unitpipe--tiny-hubert" / "refs").mkdir()
    (cache / "models--unitpipe--tiny-hubert" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert resolve_hf("unitpipe/tiny-hubert") == str(snapshot)
    by_id, by_path = describe_hf("unitpipe/tiny-hubert", 2), describe_hf(snapshot, 2)
    assert by_id.checkpoint == "unitpipe/tiny-hubert"
    assert dataclasses.replace(by_id, checkpoint=by_path.checkpoint) == by_path
    bundle = load_hf("unitpipe/tiny-hubert")
    assert SSLExtractor(bundle, 2).spec == by_id
    with pytest.raises(ModelLoadError, match="huggingface-cli download facebook/hubert-base-ls960"):
        describe_hf("facebook/hubert-base-ls960", 9)
