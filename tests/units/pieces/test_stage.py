"""The pieces stage: a model from a seeded sample, every utterance encoded exactly, exactly once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from shards.core.outputs import StageError
from tests.fairseq_checks import fairseq_label_checks
from tests.mfcc_root import build_mfcc_root
from units.features.frames import MFCC
from units.features.sampling import priority
from units.labels.model import dedup
from units.labels.stage import run as label
from units.pieces.model import Pieces
from units.pieces.stage import load_model, pieces_layout
from units.pieces.stage import run as pieces
from units.schemas import PIECES

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def root(tmp_path_factory, request, ray_local):
    """The session's MFCC root (tests/mfcc_root.py), a copy of its own: 10 utterances of
    0.5-2 s in 3 audio shards of 4, 4 and 2, k-means km8; km8's units labelled as ``it1``."""
    out = Path(build_mfcc_root(tmp_path_factory, request))
    label(str(out), "km8", "it1")
    return out


def _table(root, name: str, sub: str):
    return ds.dataset(str(root / sub / name / ("units" if sub == "labels" else "pieces")))


def _files(directory) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(directory)
        for f in files
    }


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_every_utterance_is_encoded_into_pieces_that_give_back_its_units(root, model_type):
    meta = pieces(str(root), "it1", model_type, vocab_size=16, model_type=model_type)
    labels = {r["key"]: r for r in _table(root, "it1", "labels").to_table().to_pylist()}
    table = _table(root, model_type, "pieces").to_table()
    assert table.schema == PIECES
    rows = table.to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(labels)  # Every utterance, once.
    assert meta["utterances"] == len(labels) == 10 and meta["rejects"] == 0
    assert meta["shards_written"] == len(meta["shards"]) == 3
    assert meta["vocab_size"] == 16 and meta["model_type"] == model_type and meta["k"] == 8
    assert meta["sample_utterances"] == 10  # No percent or hours: all of them.
    model, record = load_model(str(root), model_type)
    model_pieces = Pieces(model)
    assert record["sha256"] == meta["sha256"] and model_pieces.vocab_size == 16
    frames = 0
    for row in rows:
        units = np.array(labels[row["key"]]["units"], np.uint16)
        assert row["frame_rate"] == 100.0 and row["shard"] == labels[row["key"]]["shard"]
        ends = np.cumsum(row["lengths"])
        assert ends[-1] == len(units) and row["starts"] == [0, *ends[:-1].tolist()]
        for piece, start, length in zip(row["pieces"], row["starts"], row["lengths"], strict=True):
            np.testing.assert_array_equal(
                dedup(units[start : start + length])[0], model_pieces.piece_units(piece)
            )
        np.testing.assert_array_equal(model_pieces.units(row["pieces"]), dedup(units)[0])
        frames += len(units)
    assert meta["frames"] == frames and meta["pieces"] == sum(len(r["pieces"]) for r in rows)
    again = pieces(str(root), "it1", model_type, vocab_size=16, model_type=model_type)
    assert again["shards_written"] == 0
    assert {k: v for k, v in again.items() if k in meta and k not in ("throughput",
            "wall_seconds", "shards_written")} == {
        k: v for k, v in meta.items() if k not in ("throughput", "wall_seconds", "shards_written")
    }  # fmt: skip


def test_a_killed_run_resumes_to_the_same_bytes(root):
    pieces(str(root), "it1", "whole", vocab_size=14, percent=60, seed=2)
    directory = root / "pieces" / "whole"
    before = _files(directory)
    layout = pieces_layout(str(root), "whole")
    victim = sorted(os.listdir(directory / "commits"))[1].removesuffix(".json")
    # Killed mid-shard: the shard's commit never written, a temporary file left behind, and
    # no meta.json; and the model written again (a kill during training, say).
    os.remove(layout.commit_path(victim))
    os.replace(layout.shard_path("pieces", victim), directory / "pieces" / f".{victim}.tmp-1-x")
    os.remove(directory / "meta.json")
    resumed = pieces(str(root), "it1", "whole", vocab_size=14, percent=60, seed=2)
    assert resumed["shards_written"] == 1
    assert _files(directory) == before
    os.remove(directory / "pieces.json")  # Lost since: trained again, the same bytes.
    assert (
        pieces(str(root), "it1", "whole", vocab_size=14, percent=60, seed=2)["shards_written"] == 0
    )
    assert _files(directory) == before


def test_the_sample_is_the_seeded_hash_of_each_key(root):
    meta = pieces(str(root), "it1", "half", vocab_size=12, percent=50, seed=5)
    keys = [r["key"] for r in _table(root, "it1", "labels").to_table(columns=["key"]).to_pylist()]
    assert meta["sample_utterances"] == sum(priority(5, k) < 0.5 for k in keys)
    assert 0 < meta["sample_utterances"] < 10
    assert meta["utterances"] == 10  # The sample trains; every utterance is encoded.


def test_bad_inputs_are_refused_and_leave_nothing(root):
    with pytest.raises(StageError, match="no finished labels 'nope'.*pipelines.label"):
        pieces(str(root), "nope", "x", vocab_size=20)
    with pytest.raises(StageError, match=r"k=8.*vocab_size=8 should be >= 9"):
        pieces(str(root), "it1", "x", vocab_size=8)
    with pytest.raises(StageError, match="--percent or --hours, not both"):
        pieces(str(root), "it1", "x", vocab_size=20, percent=5, hours=0.001)
    with pytest.raises(StageError, match="is more pieces than"):
        pieces(str(root), "it1", "x", vocab_size=5000, model_type="unigram")
    assert not (root / "pieces" / "x" / "plan.json").exists()
    pieces(str(root), "it1", "x", vocab_size=12)  # The name is still free.
    with pytest.raises(StageError, match="other labels or options; use another --name"):
        pieces(str(root), "it1", "x", vocab_size=13)


def test_the_command_encodes_then_says_there_is_nothing_to_do(root, capsys):
    from pipelines import pieces as command

    argv = ["--root", str(root), "--labels", "it1", "--name", "cli", "--vocab-size", "12",
            "--percent", "80", "--no-progress"]  # fmt: skip
    assert command.main(argv) == 0
    out = capsys.readouterr().out
    assert "pieces: encoded 10 utterances" in out and "12-piece bpe model" in out
    assert (root / "runs" / "pieces-cli.json").exists()
    assert command.main(argv) == 0
    assert "pieces: nothing to do: the pieces are complete" in capsys.readouterr().out
    assert command.main([*argv[:-3], "--vocab-size", "8"]) == 2
    assert "vocab_size=8 should be >= 9" in capsys.readouterr().err


@pytest.mark.parametrize("level", ["frames", "pieces"])
def test_the_fairseq_export_has_a_label_line_per_tsv_line(root, level):
    from units.pieces.fairseq import export_fairseq

    pieces(str(root), "it1", "fs", vocab_size=14)
    record = export_fairseq(str(root), "fs", {"train": 70, "valid": 30}, seed=1, level=level)
    assert record["label_rate"] == (100.0 if level == "frames" else -1)
    assert sum(record["splits"].values()) == 10
    out = root / "pieces" / "fs" / "fairseq"
    assert (out / "dict.piece.txt").read_text().splitlines() == [f"{i} 1" for i in range(1, 14)]
    rows = {r["key"]: r for r in _table(root, "fs", "pieces").to_table().to_pylist()}
    manifest = {(f"{r['shard']}.zip", r["offset"]): r for r in _manifest(root)}
    for split in ("train", "valid"):
        tsv = (out / f"{split}.tsv").read_text().splitlines()[1:]
        labels = (out / f"{split}.piece").read_text().splitlines()
        assert len(tsv) == len(labels) == record["splits"][split]
        for line, label_line in zip(tsv, labels, strict=True):
            member, offset, _ = line.split("\t")[0].split(":")
            row = rows[manifest[(member, int(offset))]["key"]]
            ids = [int(i) for i in label_line.split()]
            if level == "frames":
                assert ids == np.repeat(row["pieces"], row["lengths"]).tolist()
                assert len(ids) == MFCC.frames(int(line.split("\t")[1]))  # Frame-aligned.
            else:
                assert ids == row["pieces"]
        # And fairseq's own checks pass on every split.
        checked = fairseq_label_checks(
            out / f"{split}.tsv", out / f"{split}.piece", out / "dict.piece.txt",
            record["label_rate"],
        )  # fmt: skip
        assert checked == record["splits"][split]


def _manifest(root):
    import pyarrow.parquet as pq

    return pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
