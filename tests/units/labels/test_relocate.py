"""A fairseq export still reads after its root moved: ``unitpipe relocate`` rewrites the tsvs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import shards
from pipelines import relocate as relocate_cli
from shards import synthetic
from shards.core.outputs import StageError
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from tests.fairseq_checks import fairseq_get_audio, fairseq_label_checks
from units.features.extractors import ExtractorOptions
from units.features.sampling import SampleRequest
from units.features.stage import run as extract
from units.kmeans.estimator import KMeans
from units.kmeans.stage import StageOptions
from units.kmeans.stage import run as fit_kmeans
from units.labels import fairseq as fairseq_export
from units.labels.relocate import relocate
from units.labels.stage import run_many

pytestmark = pytest.mark.usefixtures("ray_local")

SPLITS = {"train": 70, "valid": 30}


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_local):
    """Two exports of one k-means: ``fs`` into the shards; ``src`` of source files but for
    one 8 kHz source, which is resampled and so exported as its shard member."""
    corpus = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(
        str(corpus), speakers=2, chapters=1, utterances=3, seconds=(0.5, 1.5)
    )
    first = sorted(str(p) for p in corpus.rglob("*.flac"))[0]
    wav, _ = sf.read(first, dtype="int16")
    sf.write(first, wav, 8000)
    out = tmp_path_factory.mktemp("root") / "ls"
    shard([str(corpus)], str(out), ShardingOptions(max_samples=2))
    extract(str(out), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=100, seed=0))
    fit_kmeans(str(out), "mfcc", "km8", KMeans(8, seed=0, block_rows=512), StageOptions())
    # Both label sets in one pass: the files two passes of their own write (labels/test_stage).
    run_many(str(out), ["km8", "km8"], ["fs", "src"])
    for name, audio in (("fs", "shards"), ("src", "source")):
        fairseq_export.export(str(out), name, SPLITS, seed=1, audio=audio)
    return out


def _moved(root, tmp_path):
    """A copy of the root somewhere else, as ``rsync -a`` or ``cp -a`` makes it."""
    new = tmp_path / "moved" / "ls"
    shutil.copytree(root, new, symlinks=True)
    return new


def _read_back(export, root, name):
    """Every line of every split as fairseq reads it: audio equal to the root's, units equal
    to the label set's, and nothing read from outside ``root`` but source files."""
    index = shards.Index(str(root))
    units = {
        r["key"]: r["units"]
        for r in ds.dataset(str(root / "labels" / name / "units")).to_table().to_pylist()
    }
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    by_member = {(f"{r['shard']}.zip", r["offset"]): r["key"] for r in manifest}
    seen = 0
    for split in SPLITS:
        tsv = (export / f"{split}.tsv").read_text().splitlines()
        km = (export / f"{split}.km").read_text().splitlines()
        for line, labels in zip(tsv[1:], km, strict=True):
            (wav, rate), member = fairseq_get_audio(tsv[0], line.split("\t")[0])
            if member is None:  # A source file of the corpus, outside the root.
                continue
            assert member[0].startswith(str(export) + "/audio/")
            key = by_member[(os.path.basename(member[0]), member[1])]
            np.testing.assert_array_equal(wav, index.get(key).waveform)
            assert [int(u) for u in labels.split()] == list(units[key]) and rate == 16000
            seen += 1
        fairseq_label_checks(
            export / f"{split}.tsv", export / f"{split}.km", export / "dict.km.txt", 100.0
        )
    return seen


def test_a_moved_root_reads_back_from_its_new_place_after_relocate(root, tmp_path):
    new = _moved(root, tmp_path)
    export = new / "labels" / "fs" / "fairseq"
    assert (export / "train.tsv").read_text().splitlines()[0] == str(
        root / "labels/fs/fairseq/audio"
    )
    result = relocate(str(export))
    assert result["rewritten"] == ["train.tsv", "valid.tsv"] and result["relinked"] == 0
    assert _read_back(export, new, "fs") == 6
    # Moved with the root, the relative links needed nothing; a second run changes nothing.
    assert relocate(str(export))["rewritten"] == []


def test_a_source_export_keeps_its_sources_and_moves_its_shard_lines(root, tmp_path):
    new = _moved(root, tmp_path)
    export = new / "labels" / "src" / "fairseq"
    lines = [
        line for split in SPLITS for line in (export / f"{split}.tsv").read_text().splitlines()[1:]
    ]
    relocate(str(export))
    after = [
        line for split in SPLITS for line in (export / f"{split}.tsv").read_text().splitlines()[1:]
    ]
    moved = [(a, b) for a, b in zip(lines, after, strict=True) if a != b]
    # The 8 kHz utterance's line moves into the new root; the sources' lines stay.
    assert len(moved) == 1 and moved[0][1].startswith(str(export).lstrip("/") + "/audio/")
    assert _read_back(export, new, "src") == 1


def test_an_export_moved_without_its_shards_says_so_and_relinks_to_given_ones(root, tmp_path):
    alone = tmp_path / "alone" / "a" / "b" / "fairseq"
    shutil.copytree(root / "labels" / "fs" / "fairseq", alone, symlinks=True)
    with pytest.raises(StageError, match="the shard is not there.*--shards"):
        relocate(str(alone))
    result = relocate(str(alone), shards_dir=str(root / "shards"))
    assert result["relinked"] == 3 and result["rewritten"] == ["train.tsv", "valid.tsv"]
    assert _read_back(alone, root, "fs") == 6


def test_the_command_relocates_every_export_under_a_root_once(root, tmp_path, capsys):
    new = _moved(root, tmp_path)
    assert relocate_cli.main(["--root", str(new), "-q"]) == 0
    first = capsys.readouterr().out
    assert "2 of 2 exports changed" in first
    assert relocate_cli.main(["--root", str(new), "-q"]) == 0
    assert "0 of 2 exports changed" in capsys.readouterr().out
    assert (new / "runs" / "relocate.json").exists()
    assert relocate_cli.main(["--root", str(new), "--labels", "nope", "-q"]) == 2
