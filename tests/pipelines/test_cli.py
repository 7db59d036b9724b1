"""The ``unitpipe`` command: quick help, one summary per subcommand, examples that paste; one
parser per stage with its name in usage; every argument and config value checked before Ray
starts, each error one line with exit status 2; logging set by --log-level and -q."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from pipelines import cli
from tests.pipelines.cli_runs import HEAVY, REPO, unitpipe


def test_the_command_list_imports_no_stage_and_no_heavy_library():
    probe = (
        "import sys, contextlib, io\n"
        "from pipelines import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['--help']) == 0\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}"
        " or m.startswith('pipelines.') and m != 'pipelines.cli'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_each_summary_is_the_first_line_of_its_module(name):
    doc = importlib.import_module(f"pipelines.{name}").__doc__
    assert cli.SUMMARIES[name] == doc.strip().splitlines()[0]


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_help_examples_are_shell_lines_that_paste(name):
    doc = importlib.import_module(f"pipelines.{name}").__doc__
    example = doc[doc.index("Example:") :]
    commands = [line for line in example.splitlines() if line.strip()]
    for line in commands:
        # A backslash-newline in a non-raw docstring joins two lines into one: flags then sit
        # after a run of spaces, and the continuation is lost.
        assert not re.search(r"\S {3,}--", line), line
    continued = [line for line in commands if line.rstrip().endswith("\\")]
    assert all(line.endswith(" \\") for line in continued)


def test_the_demo_package_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--workdir" in out.stdout


# ------------------------------------------------------------------ one parser per stage
@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_unitpipe_help_names_the_subcommand_and_imports_nothing_heavy(name):
    run = unitpipe(name, "--help")
    assert run.code == 0, run.stderr
    assert run.stdout.startswith(f"usage: unitpipe {name} "), run.stdout[:200]
    assert "--log-level" in run.stdout and "--quiet" in run.stdout
    assert run.modules == [] and not run.ray_started


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_each_module_keeps_its_own_name_in_usage(name):
    out = subprocess.run(
        [sys.executable, "-m", f"pipelines.{name}", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m pipelines.{name} "), out.stdout[:200]


def test_a_bad_flag_is_one_line_naming_the_command():
    run = unitpipe("kmeans", "--root", "r", "--features", "f", "--name", "n", "--k", "abc")
    assert run.code == 2 and not run.ray_started
    assert run.error_lines == [
        "unitpipe kmeans: error: argument --k: expected an integer, got 'abc'"
    ]
    run = unitpipe("nope")
    assert run.code == 2 and len(run.error_lines) == 1 and "'nope'" in run.stderr


def test_the_cli_choices_are_the_librarys():
    from pipelines import kmeans, shard
    from shards import vad
    from shards.discover import AUDIO_EXTENSIONS, LAYOUTS
    from units.kmeans import estimator

    assert shard.LAYOUTS == LAYOUTS and shard.DETECTORS == vad.DETECTORS
    assert shard.AUDIO_EXTENSIONS == AUDIO_EXTENSIONS
    assert kmeans.INITS == estimator.INITS and kmeans.ALGORITHMS == estimator.ALGORITHMS


# ------------------------------------------------------------------ checked before Ray
CONFIG = "configs/hubert-mfcc.yaml"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "label",
                "--root",
                "ROOT",
                "--kmeans",
                "km",
                "--name",
                "l",
                "--fairseq-splits",
                "train=90",
            ],
            "unitpipe label: error: argument --fairseq-splits: split percents train=90 add up "
            "to 90, not 100",
        ),
        (
            [
                "label",
                "--root",
                "ROOT",
                "--kmeans",
                "km",
                "--name",
                "l",
                "--fairseq-splits",
                "train=90,dev.clean=10",
            ],
            "split name 'dev.clean' must be letters, digits",
        ),
        (
            ["hubert", "--config", CONFIG, "root=ROOT", "kmeans.k=abc"],
            "unitpipe hubert: error: kmeans.k: expected an integer, got 'abc'",
        ),
        (
            ["kmeans", "--root", "ROOT", "--features", "f", "--name", "k", "--k", "70000"],
            "unitpipe kmeans: error: n_clusters=70000 must be at most 65536: units are stored "
            "as uint16",
        ),
        (
            ["hubert", "--config", CONFIG, "root=ROOT", "kmeans.k=70000"],
            "unitpipe hubert: error: kmeans: n_clusters=70000 must be at most 65536",
        ),
        (
            ["hubert", "--config", CONFIG, "root=ROOT", "label.fairseq_splits={train: 90}"],
            "label.fairseq_splits: split percents train=90 add up to 90, not 100",
        ),
        (["hubert", "root=ROOT", "kmeans.whiten=yes please"], "kmeans.whiten: expected true"),
        (["hubert", "root=ROOT", "features.dtype=fp32"], "features.dtype: expected one of"),
        (["hubert", "root=ROOT", "features.percent=0"], "--percent must be in (0, 100]"),
        (["hubert", "root=ROOT", "shard.shard_bytes=lots"], "cannot read 'lots' as a size"),
        (["hubert", "root=ROOT", "ray.num_cpus=0"], "ray.num_cpus: must be >= 1, got 0"),
        (["hubert", "root=ROOT", "label.fairseq_splits={train:"], "not YAML"),
        (["hubert", "root=ROOT", "kmeans.max_iter=0"], "max_iter=0 must be >= 1"),
    ],
)
def test_bad_arguments_and_config_values_are_one_line_and_exit_2_before_ray(
    tmp_path, argv, message
):
    run = unitpipe(*[a.replace("ROOT", str(tmp_path / "root")) for a in argv])
    assert run.code == 2, run.stderr[-2000:]
    assert len(run.error_lines) == 1, run.stderr[-2000:]
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not run.ray_started and not (tmp_path / "root").exists()


def test_print_config_shows_every_key_resolved_and_starts_nothing():
    import yaml

    from pipelines import hubert

    run = unitpipe("hubert", "--print-config", "--config", CONFIG, "kmeans.k=7", "--num-cpus=3")
    assert run.code == 0, run.stderr
    assert not run.ray_started and "ray" not in run.modules
    shown = yaml.safe_load(run.stdout)
    assert {k: sorted(v) if isinstance(v, dict) else None for k, v in shown.items()} == {
        k: sorted(v) if isinstance(v, dict) else None for k, v in hubert.DEFAULTS.items()
    }
    assert shown["kmeans"]["k"] == 7 and shown["ray"]["num_cpus"] == 3
    assert shown["root"] == "demo-output/hubert" and shown["shard"]["shard_bytes"] == "1GiB"
    assert shown["label"]["fairseq_splits"] == {"train": 99, "valid": 1}
    assert shown["kmeans"]["tol"] == 1e-4 and shown["features"]["dtype"] is None


def test_hubert_reaches_every_stage_option_and_documents_every_key():
    from pipelines import features, hubert, kmeans, label, report, shard

    for section, module in (
        ("shard", shard), ("features", features), ("kmeans", kmeans), ("label", label),
        ("report", report),
    ):  # fmt: skip
        assert set(hubert.DEFAULTS[section]) == set(module.OPTIONS), section
    for key in ("features.dtype", "features.batch_seconds", "features.threads",
                "kmeans.stream", "kmeans.fairseq_export", "label.fairseq_audio"):  # fmt: skip
        section, name = key.split(".")
        assert name in hubert.DEFAULTS[section], key
    for section, values in hubert.DEFAULTS.items():
        keys = [f"{section}.{k}" for k in values] if isinstance(values, dict) else [section]
        for key in keys:
            assert re.search(rf"(^|\s){re.escape(key)}(\s|$)", hubert.__doc__), key


# ------------------------------------------------------------------ logging
def test_quiet_and_log_level_set_what_reaches_stderr(tmp_path):
    probe = (
        "import logging, sys\n"
        "from pipelines import cli\n"
        "code = cli.main(sys.argv[1:])\n"
        "for level in ('debug', 'info', 'warning'):\n"
        "    getattr(logging.getLogger('units.kmeans.estimator'), level)(f'probe {level}')\n"
        "logging.getLogger('matplotlib.font_manager').info('probe font cache')\n"
        "sys.exit(code)\n"
    )
    argv = ["kmeans", "--root", str(tmp_path), "--features", "f", "--name", "k", "--k", "4"]

    def stderr(*extra):
        done = subprocess.run(
            [sys.executable, "-c", probe, *argv, *extra],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr  # No feature store: after logging is set.
        return done.stderr

    default = stderr()
    assert "probe info" in default and "probe warning" in default
    assert "probe debug" not in default and "probe font cache" not in default
    quiet = stderr("-q")
    assert "probe info" not in quiet and "probe warning" in quiet
    debug = stderr("--log-level", "debug")
    assert "probe debug" in debug and "probe font cache" not in debug
    both = unitpipe(*argv, "-q", "--log-level", "INFO")
    assert both.code == 2 and len(both.error_lines) == 1 and "not allowed with" in both.stderr
