"""``python -m pipelines.label`` as a user runs it."""

from __future__ import annotations

import pytest

from pipelines import label


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as done:
        label.main(["--help"])
    assert done.value.code == 0
    assert "python -m pipelines.label --root" in capsys.readouterr().out


def test_a_missing_kmeans_exits_2_before_starting_ray(tmp_path, capsys):
    assert label.main(["--root", str(tmp_path), "--kmeans", "km", "--name", "l"]) == 2
    assert "no finished k-means 'km'" in capsys.readouterr().err


def test_bad_splits_exit_2(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "--kmeans", "km", "--name", "l"]
    assert label.main([*argv, "--fairseq-splits", "train:99"]) == 2
    assert "is not NAME=PERCENT" in capsys.readouterr().err
    assert label.parse_splits("train=99, valid=1") == {"train": 99.0, "valid": 1.0}
