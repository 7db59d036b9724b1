"""``unitpipe export FORMAT`` as a user runs it: one Ray task per shard, a record and a summary,
a rerun that does nothing, a lost shard file redone, and one-line usage errors."""

from __future__ import annotations

import glob
import json
import os

import pytest

from pipelines import export
from tests.exports_root import LABELS, build_exports_root
from tests.pipelines.cli_runs import exit_status

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def root(tmp_path_factory, request, ray_local) -> str:
    return build_exports_root(tmp_path_factory, request)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = exit_status(export.main, [*argv, "--log-level", "WARNING"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_help_shows_the_formats_and_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "unitpipe export nemo --root" in out and "lhotse, nemo, hf" in out


def test_nemo_writes_every_shard_then_a_rerun_has_nothing_to_do(root, capsys):
    code, out, err = run(capsys, "nemo", "--root", root, "--labels", LABELS, "--workers", "2")
    assert code == 0, err
    directory = os.path.join(root, "labels", LABELS, "nemo")
    assert "export nemo: wrote 4 shard(s); 7 utterances" in out
    assert "1 label-pass rejects left out" in out
    assert f"tarred_audio_filepaths: {directory}/audio__OP_0..3_CL_.tar" in out
    assert len(glob.glob(os.path.join(directory, "sharded_manifests", "manifest_*.json"))) == 4
    assert len(glob.glob(os.path.join(directory, "audio_*.tar"))) == 4
    record = read_json(os.path.join(root, "runs", f"export-nemo-{LABELS}.json"))
    assert (record["shards_written"], record["utterances"], record["unlabelled"]) == (4, 7, 1)
    assert record["export"] == read_json(os.path.join(directory, "export.json"))

    code, out, err = run(capsys, "nemo", "--root", root, "--labels", LABELS)
    assert code == 0, err
    assert "export nemo: nothing to do: the export is complete; 7 utterances" in out
    record = read_json(os.path.join(root, "runs", f"export-nemo-{LABELS}.json"))
    assert (record["shards_written"], record["shards_skipped"]) == (0, 4)


def test_hf_redoes_only_the_shard_whose_file_was_deleted(root, tmp_path, capsys):
    out_dir = str(tmp_path / "hf")
    code, out, err = run(capsys, "hf", "--root", root, "--labels", LABELS, "--out", out_dir)
    assert code == 0, err
    assert f'load_dataset("parquet", data_dir="{out_dir}", split="train")' in out
    files = sorted(glob.glob(os.path.join(out_dir, "data", "train-*-of-00004.parquet")))
    assert len(files) == 4
    kept = {path: os.stat(path).st_mtime_ns for path in files if "00001-" not in path}
    os.remove(files[1])

    code, out, err = run(capsys, "hf", "--root", root, "--labels", LABELS, "--out", out_dir)
    assert code == 0, err
    assert "export hf: wrote 1 shard(s); 7 utterances" in out
    assert os.path.exists(files[1])
    assert {path: os.stat(path).st_mtime_ns for path in kept} == kept
    record = read_json(os.path.join(root, "runs", f"export-hf-{LABELS}.json"))
    assert (record["shards_written"], record["shards_skipped"]) == (1, 3)


def test_no_such_label_set_exits_2_with_one_line(root, capsys):
    code, out, err = run(capsys, "hf", "--root", root, "--labels", "nope")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"python -m pipelines.export: error: no label set 'nope' under {root} "
        f"(label sets: {LABELS})"
    ]


def test_an_unfinished_label_set_exits_2_and_says_so(tmp_path_factory, request, capsys):
    root = build_exports_root(tmp_path_factory, request)
    os.remove(os.path.join(root, "labels", LABELS, "meta.json"))
    code, _, err = run(capsys, "nemo", "--root", root, "--labels", LABELS)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"label set '{LABELS}' under {root} is unfinished" in err
    assert not os.path.exists(os.path.join(root, "labels", LABELS, "nemo"))


def test_a_nemo_export_to_an_object_store_exits_2_before_any_work(root, capsys):
    code, _, err = run(capsys, "nemo", "--root", root, "--labels", LABELS, "--out", "s3://b/x")
    assert code == 2 and "an object store has no links" in err


def test_a_format_without_its_package_names_the_extra_to_install(root, capsys, monkeypatch):
    # As if datasets were not installed: the check looks the package up by this name.
    monkeypatch.setitem(export.FORMATS, "hf", "datasets_not_installed_here")
    code, _, err = run(capsys, "hf", "--root", root, "--labels", LABELS)
    assert code == 2
    assert "pip install 'unitpipe[hf]'" in err and "datasets_not_installed_here" in err
