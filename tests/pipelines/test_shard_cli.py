"""``python -m pipelines.shard`` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipelines import shard
from shards import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as done:
        shard.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "python -m pipelines.shard --input" in out and "--segment" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--input", "/no/such/corpus", "--output", "OUT"], "does not exist"),
        (["--input", "IN", "--output", "IN/root"], "inside input"),
        (["--input", "IN", "--output", "OUT", "--shard-bytes", "lots"], "as a size"),
        (["--input", "IN", "--output", "OUT", "--target-seconds", "0"], "must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_before_starting_ray(tmp_path, capsys, args, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    args = [a.replace("IN", str(corpus)).replace("OUT", str(tmp_path / "out")) for a in args]
    assert shard.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (corpus / "root").exists()


def test_unknown_layout_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as done:
        shard.main(["--input", "x", "--output", "y", "--layout", "timit"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "python -m pipelines.shard: error: argument --layout: expected one of auto, "
        "librispeech, librilight, dir, list, got 'timit'\n"
    )


@pytest.mark.slow
def test_the_command_shards_then_says_there_is_nothing_to_do(tmp_path):
    synthetic.write_librispeech(str(tmp_path / "ls"), speakers=1, chapters=1, utterances=3)
    cmd = [
        sys.executable,
        "-m",
        "pipelines.shard",
        "--input",
        str(tmp_path / "ls"),
        "--output",
        str(tmp_path / "root"),
        "--num-cpus",
        "1",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=REPO)
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    record = tmp_path / "root" / "runs" / "shard.json"
    summary = json.loads(record.read_text())  # The record; stdout has a summary only.
    assert summary["segments"] == 3 and summary["shards_written"] == 1
    assert "wrote 1 shard(s)" in first.stdout and f"record: {record}" in first.stdout
    assert "{" not in first.stdout and len(first.stdout.splitlines()) <= 4
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert second.returncode == 0 and "nothing to do: 1 shards" in second.stdout
