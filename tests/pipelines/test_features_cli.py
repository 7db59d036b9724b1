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


def test_the_check_describes_the_extractor_without_loading_it(tmp_path, monkeypatch):
    import argparse

    from tests.models import save_tiny
    from units.features import extractors

    directory = save_tiny(tmp_path / "hubert")
    parser = argparse.ArgumentParser()
    features.add_arguments(parser)
    argv = ["--root", str(tmp_path), "--name", "n", "--percent", "10"]
    args = parser.parse_args([*argv, "--extractor", f"hf:{directory}", "--layer", "2"])

    def refuse(options):
        raise AssertionError("the check built an extractor")

    monkeypatch.setattr(extractors, "build", refuse)
    features.check(args)  # The spec it plans with, from the directory's config and sha256.
    assert args.spec == extractors.describe(features.extractor_options(args))
    assert (args.spec.extractor, args.spec.checkpoint, args.spec.layer) == ("hf", directory, 2)


def test_batch_seconds_has_one_default_the_extractor_options_one():
    from pipelines import hubert
    from units.features.extractors import ExtractorOptions

    default = ExtractorOptions("mfcc").batch_seconds
    assert features.OPTIONS["batch_seconds"].default == default
    assert f"features.batch_seconds [{default:g}]" in hubert.__doc__
