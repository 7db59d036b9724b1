"""Building extractors by name, as the feature stage and its CLI do."""

import numpy as np
import pytest
import torch

from tests.units.features.test_fairseq_checkpoint import cfg_checkpoint, save, tiny_model
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
