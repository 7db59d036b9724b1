"""Extractors by name, as the feature stage and its CLI use them: what one computes
(described without building it), and building it."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from tests.models import save_tiny
from tests.units.features.test_fairseq_checkpoint import (
    args_checkpoint,
    cfg_checkpoint,
    finetuned_checkpoint,
    save,
    tiny_model,
)
from units.features import extractors
from units.features.extractor import FBANK_SPEC, MFCC_SPEC
from units.features.extractors import ExtractorError, ExtractorOptions
from units.features.frames import SSL
from units.features.ssl import SSLExtractor, SSLModel


def test_mfcc_and_fbank_by_name():
    assert extractors.build(ExtractorOptions("mfcc")).spec == MFCC_SPEC
    assert extractors.build(ExtractorOptions("fbank")).spec == FBANK_SPEC


@pytest.mark.parametrize("normalize", [False, True])
def test_a_fairseq_checkpoint_extracts_what_the_model_it_was_made_from_extracts(
    tmp_path, normalize
):
    original = tiny_model("hubert", "base")
    path = tmp_path / "hubert.pt"
    save(cfg_checkpoint(original, "hubert", normalize=normalize), path)
    extractor = extractors.build(ExtractorOptions(f"fairseq:{path}", layer=2))
    spec = extractor.spec
    assert (spec.extractor, spec.architecture, spec.layer, spec.dim) == ("fairseq", "hubert", 2, 32)
    assert spec.normalize_waveform is normalize and len(spec.checkpoint_sha256) == 64
    reference = SSLExtractor(
        SSLModel.from_transformers(
            original, path=str(path), sha256="x", normalize_waveform=normalize
        ),
        2,
    )
    wav = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 0.1
    [ours] = extractor([wav])
    [theirs] = reference([wav])
    assert ours.shape == (SSL.frames(5000), 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_layer_beyond_the_model_is_an_extractor_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "hubert.pt"
    save(cfg_checkpoint(tiny_model("hubert", "base"), "hubert", normalize=False), path)
    with pytest.raises(ExtractorError, match="out of range"):
        extractors.build(ExtractorOptions(f"fairseq:{path}", layer=3))


def test_a_corrupt_checkpoint_is_an_extractor_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(ExtractorError):
        extractors.build(ExtractorOptions(f"fairseq:{path}", layer=1))


def test_a_missing_checkpoint_is_an_extractor_error(tmp_path):
    with pytest.raises(ExtractorError, match="nope.pt"):
        extractors.build(ExtractorOptions(f"fairseq:{tmp_path / 'nope.pt'}", layer=1))


# --- describe: the spec from the name and the layer, no model built ---------------------


def _hf(tmp_path, family: str, large: bool, do_normalize: bool | None = None) -> str:
    name = f"{family}-{'large' if large else 'base'}-{do_normalize}"
    directory = save_tiny(tmp_path / name, family, large)
    if do_normalize is not None:
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump({"do_normalize": do_normalize}, f)
    return directory


def _fairseq(tmp_path, kind: str) -> str:
    if kind == "cfg":
        state = cfg_checkpoint(tiny_model("hubert", "base"), "hubert", normalize=True)
    elif kind == "ctc":
        state = finetuned_checkpoint(tiny_model("wav2vec2", "large"), "wav2vec2", True)
    else:  # An old checkpoint: args Namespace, and (legacy) not a zip file.
        state = args_checkpoint(tiny_model("wav2vec2", "large"), normalize=False)
    return str(save(state, tmp_path / f"{kind}.pt", legacy=kind == "legacy"))


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


#: name -> (options for a tmp_path, expected (extractor, architecture, dim, normalize)).
CASES = {
    "mfcc": (lambda _: ExtractorOptions("mfcc"), ("mfcc", None, 39, False)),
    "fbank": (lambda _: ExtractorOptions("fbank"), ("fbank", None, 80, False)),
    "hf hubert base": (
        lambda p: ExtractorOptions(f"hf:{_hf(p, 'hubert', False)}", layer=3),
        ("hf", "hubert", 32, False),
    ),
    "hf wav2vec2 large": (  # A layer-norm front end: normalises, by default.
        lambda p: ExtractorOptions(f"hf:{_hf(p, 'wav2vec2', True)}", layer=1),
        ("hf", "wav2vec2", 32, True),
    ),
    "hf wav2vec2 large, do_normalize false": (
        lambda p: ExtractorOptions(f"hf:{_hf(p, 'wav2vec2', True, False)}", layer=2),
        ("hf", "wav2vec2", 32, False),
    ),
    "fairseq cfg": (
        lambda p: ExtractorOptions(f"fairseq:{_fairseq(p, 'cfg')}", layer=2),
        ("fairseq", "hubert", 32, True),
    ),
    "fairseq ctc": (
        lambda p: ExtractorOptions(f"fairseq:{_fairseq(p, 'ctc')}", layer=1),
        ("fairseq", "wav2vec2", 32, True),
    ),
    "fairseq legacy": (
        lambda p: ExtractorOptions(f"fairseq:{_fairseq(p, 'legacy')}", layer=2),
        ("fairseq", "wav2vec2", 32, False),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_describe_says_what_the_built_extractor_computes(tmp_path, case):
    make, (extractor, architecture, dim, normalize) = CASES[case]
    options = make(tmp_path)
    described = extractors.describe(options)
    assert described == extractors.build(options).spec
    assert (described.extractor, described.architecture) == (extractor, architecture)
    assert (described.dim, described.normalize_waveform) == (dim, normalize)
    assert (described.checkpoint, described.layer) == (options.checkpoint, options.layer)
    if options.checkpoint is not None:
        weights = options.checkpoint
        if os.path.isdir(weights):
            weights = os.path.join(weights, "model.safetensors")
        assert described.checkpoint_sha256 == _sha256(weights)


def test_describe_builds_no_network(tmp_path, monkeypatch):
    options = {case: make(tmp_path) for case, (make, _) in CASES.items()}
    specs = {case: extractors.build(o).spec for case, o in options.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("a torch module was built")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    with pytest.raises(ExtractorError, match="a torch module was built"):
        extractors.build(options["hf hubert base"])  # The guard bites.
    assert {case: extractors.describe(o) for case, o in options.items()} == specs


def test_describe_reads_a_fairseq_checkpoint_weights_only_and_maps_its_tensors(
    tmp_path, monkeypatch
):
    options = CASES["fairseq cfg"][0](tmp_path)
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    extractors.describe(options)
    assert [(c["weights_only"], c["mmap"]) for c in calls] == [(True, True)]


def test_describe_reads_no_weights_so_weights_that_do_not_load_fail_at_build(tmp_path):
    options = CASES["hf hubert base"][0](tmp_path)
    weights = os.path.join(options.checkpoint, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(1000)  # A truncated download: its config still says what it would compute.
    assert extractors.describe(options).checkpoint_sha256 == _sha256(weights)
    with pytest.raises(ExtractorError, match="could not load weights"):
        extractors.build(options)


def _bad_options(tmp_path) -> dict[str, ExtractorOptions]:
    hf = _hf(tmp_path, "hubert", False)
    unsupported = tmp_path / "bert"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "bert"}))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 100)
    fairseq = _fairseq(tmp_path, "cfg")
    return {
        "unknown extractor": ExtractorOptions("spectrogram"),
        "--layer applies": ExtractorOptions("fbank", layer=2),
        "give a local path": ExtractorOptions("hf:", layer=2),
        "give --layer": ExtractorOptions(f"fairseq:{fairseq}"),
        "does not exist": ExtractorOptions(f"hf:{tmp_path / 'nope'}", layer=1),
        "not found": ExtractorOptions(f"fairseq:{tmp_path / 'nope.pt'}", layer=1),
        "is not supported": ExtractorOptions(f"hf:{unsupported}", layer=1),
        "not a readable torch checkpoint": ExtractorOptions(f"fairseq:{corrupt}", layer=1),
        "out of range: " + hf: ExtractorOptions(f"hf:{hf}", layer=4),
        "out of range: " + fairseq: ExtractorOptions(f"fairseq:{fairseq}", layer=3),
        "should be an int": ExtractorOptions(f"hf:{hf}", layer=True),
    }


def test_describe_refuses_what_build_refuses_with_the_same_message(tmp_path):
    for message, options in _bad_options(tmp_path).items():
        with pytest.raises(ExtractorError) as described:
            extractors.describe(options)
        with pytest.raises(ExtractorError) as built:
            extractors.build(options)
        assert message in str(described.value)
        assert str(described.value) == str(built.value)


# --- options: what is computed as fields, how it runs beside them -------------------------


def test_a_name_is_split_once_into_extractor_and_checkpoint():
    given = ExtractorOptions("hf:/models/a:b", layer=6, device="cuda")
    assert (given.extractor, given.checkpoint, given.layer) == ("hf", "/models/a:b", 6)
    assert given == ExtractorOptions("hf", layer=6, device="cuda", checkpoint="/models/a:b")
    assert given.name == "hf:/models/a:b" and ExtractorOptions("mfcc").name == "mfcc"
    assert ExtractorOptions("mfcc").checkpoint is None


def test_options_from_a_spec_rebuild_it_and_take_how_to_run_apart(tmp_path):
    assert ExtractorOptions.from_spec(MFCC_SPEC) == ExtractorOptions("mfcc")
    assert ExtractorOptions.from_spec(FBANK_SPEC, device="cuda").device == "cuda"
    original = CASES["fairseq cfg"][0](tmp_path)
    spec = extractors.describe(original)
    again = ExtractorOptions.from_spec(spec, batch_seconds=30.0, threads=1)
    assert (again.extractor, again.checkpoint, again.layer) == ("fairseq", spec.checkpoint, 2)
    assert (again.batch_seconds, again.threads) == (30.0, 1)
    assert again == dataclasses.replace(original, batch_seconds=30.0, threads=1)
    assert extractors.describe(again) == spec


def test_a_stage_buckets_one_batch_on_cpu_and_eight_on_a_gpu_unless_told():
    from units.features.extractors import GPU_BUCKET_BATCHES

    assert ExtractorOptions("mfcc").bucket == 120.0
    assert ExtractorOptions("hf:/m", layer=9, device="cuda").bucket == 120.0 * GPU_BUCKET_BATCHES
    assert ExtractorOptions("hf:/m", layer=9, device="cuda:1", batch_seconds=50).bucket == 400.0
    assert ExtractorOptions("hf:/m", layer=9, device="cuda", bucket_seconds=300).bucket == 300.0
    # How features run, never what they are: the spec's options leave it at its default.
    assert ExtractorOptions.from_spec(FBANK_SPEC, device="cuda").bucket_seconds is None
