"""``python -m pipelines.features`` as a user runs it."""

import pytest

from pipelines import features


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as done:
        features.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "python -m pipelines.features --root" in out and "--layer" in out


def test_percent_and_hours_are_exclusive_and_one_is_required(capsys):
    for args in (["--percent", "1", "--hours", "1"], []):
        with pytest.raises(SystemExit) as done:
            features.main(["--root", "r", "--name", "n", "--extractor", "mfcc", *args])
        assert done.value.code == 2
    assert "--percent" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--extractor", "wav2vec"], "unknown extractor"),
        (["--extractor", "mfcc", "--layer", "3"], "--layer applies"),
        (["--extractor", "hf:/no/such/dir", "--layer", "3"], "/no/such/dir"),
        (["--extractor", "mfcc", "--percent", "0"], "--percent must be"),
    ],
)
def test_bad_extractors_exit_2_before_starting_ray(tmp_path, capsys, args, message):
    base = ["--root", str(tmp_path), "--name", "n"]
    if "--percent" not in args:
        args = [*args, "--percent", "10"]
    assert features.main(base + args) == 2
    assert message in capsys.readouterr().err
