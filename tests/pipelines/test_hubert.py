"""``python -m pipelines.hubert`` and the ``unitpipe`` command, as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipelines import cli, hubert
from pipelines.demo.corpus import write_demo_corpus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "hubert-mfcc.yaml")


def test_config_is_defaults_then_file_then_overrides():
    config = hubert.load_config(
        CONFIG, ["root=/data/x", "kmeans.k=500", "label.fairseq_splits={train: 90, valid: 10}"]
    )
    assert config["root"] == "/data/x" and config["kmeans"]["k"] == 500
    assert config["label"]["fairseq_splits"] == {"train": 90, "valid": 10}
    assert config["features"]["percent"] == 10 and config["kmeans"]["tol"] == 1e-4
    assert config["shard"] == dict(hubert.DEFAULTS["shard"], shard_bytes="1GiB")
    assert hubert.load_config(CONFIG, ["shard.shard_bytes=2MiB"])["shard"]["shard_bytes"] == "2MiB"
    assert hubert.load_config(None, ["root=/r", "inputs=/corpus"])["inputs"] == ["/corpus"]
    # Every key is there, typed: what a stage gets is what --print-config shows.
    assert {s: set(v) for s, v in config.items() if isinstance(v, dict)} == {
        s: set(v) for s, v in hubert.DEFAULTS.items() if isinstance(v, dict)
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["root=/r", "kmeans.kk=5"], r"unknown key 'kmeans.kk'; known: kmeans.algorithm"),
        (["root=/r", "shard.colour=red"], r"unknown key 'shard.colour'"),
        (["root=/r", "kmeans"], r"expected section.key=value"),
        (["root=/r", "kmeans=5"], r"kmeans is a section"),
        ([], r"root is required"),
        (["root=/r", "features.extractor=null"], r"features.extractor is required"),
        (["root=/r", "kmeans.k=abc"], r"kmeans.k: expected an integer, got 'abc'"),
        (["root=/r", "kmeans.k=5.0"], r"kmeans.k: expected an integer, got 5.0"),
        (["root=/r", "kmeans.pca=0"], r"kmeans.pca: must be >= 1, got 0"),
        (["root=/r", "kmeans.tol=fast"], r"kmeans.tol: expected a number, got 'fast'"),
        (["root=/r", "features.gpus_per_worker=-1"], r"gpus_per_worker: must be >= 0"),
        (["root=/r", "label.dedup=1"], r"label.dedup: expected true or false, got 1"),
        (["root=/r", "label.split_by=book"], r"label.split_by: expected one of utterance"),
        (["root=/r", "label.fairseq_splits=[train]"], r"label.fairseq_splits: expected"),
        (["root=/r", "label.fairseq_splits={train: 99, valid: x}"], r"split 'valid': expected"),
        (["root=/r", "inputs={a: 1}"], r"inputs: expected a list of strings"),
    ],
)
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(hubert.ConfigError, match=message):
        hubert.load_config(None, overrides)


def test_bad_config_exits_2_before_ray(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("root: [unclosed\n")
    assert hubert.main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert hubert.main(["root=/r", "inputs=/c", "shard.layout=weird"]) == 2
    assert "layout" in capsys.readouterr().err


def test_unitpipe_lists_every_subcommand_and_each_help_has_an_example(capsys):
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert f"  {name} " in listing
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0
        assert "Example" in capsys.readouterr().out, name
    assert cli.main(["nope"]) == 2
    # The installed console script is the same command.
    script = os.path.join(os.path.dirname(sys.executable), "unitpipe")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "hubert" in out.stdout


@pytest.mark.slow
def test_one_config_runs_every_stage_and_a_rerun_skips_them(tmp_path, ray_local, capsys):
    corpus = tmp_path / "corpus"
    write_demo_corpus(str(corpus), minutes=0.5, speakers=2, seed=3)  # 6 utterances
    root = tmp_path / "root"
    argv = [
        "--config", CONFIG, f"root={root}", f"inputs=[{corpus}]", "shard.max_samples=4",
        "features.percent=50", "kmeans.k=16", f"report.phones={corpus / 'phones.tsv'}",
        "label.fairseq_splits={train: 80, valid: 20}", "kmeans.fairseq_export=true",
        "features.batch_seconds=60",
    ]  # fmt: skip
    assert hubert.main(argv) == 0
    first = capsys.readouterr().out
    for stage in ("shard", "features", "kmeans", "label", "fairseq"):
        assert f"== {stage}: done" in first
    assert (root / "kmeans" / "mfcc100" / "kmeans.joblib").exists()  # Every stage option.
    # Records in files, summaries on stdout.
    record = json.loads((root / "runs" / "hubert-it1.json").read_text())
    assert record["config"]["kmeans"]["k"] == 16 and record["label"]["k"] == 16
    assert record["config"]["features"]["batch_seconds"] == 60
    for name in ("shard", "features-mfcc", "kmeans-mfcc100", "label-it1", "report-it1"):
        assert f"record: {root / 'runs' / name}.json" in first, name
    assert '"shards_written"' not in first and len(first.splitlines()) < 40
    utterances = len((corpus / "phones.tsv").read_text().splitlines())
    labels = pq.read_table(root / "labels" / "it1" / "units").num_rows
    assert labels == utterances
    assert (root / "labels" / "it1" / "fairseq" / "valid.km").exists()
    metrics = json.loads((root / "reports" / "it1" / "metrics.json").read_text())
    assert metrics["k"] == 16 and metrics["phones"]["utterances"] == utterances
    assert hubert.main(argv) == 0
    second = capsys.readouterr().out
    for stage in ("shard", "features", "kmeans", "label"):
        assert f"== {stage}: already complete" in second
