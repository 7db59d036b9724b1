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
