"""The ``unitpipe`` command: quick help, one summary per subcommand, examples that paste."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from pipelines import cli

#: Libraries that take seconds to import: printing the command list needs none of them.
HEAVY = ("torch", "ray", "scipy", "matplotlib", "transformers", "pyarrow")


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
