"""Running ``unitpipe`` as a user does, in a fresh interpreter, and seeing what it left:
its exit status, stdout, stderr, and whether it started Ray or imported a heavy library."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Libraries that take seconds to import.
HEAVY = ("torch", "ray", "scipy", "matplotlib", "transformers", "pyarrow")

_PROBE = """
import json, os, sys
from pipelines import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
ray = sys.modules.get("ray")
with open(os.environ["CLI_RUN_OUT"], "w") as f:
    json.dump({
        "code": code,
        "ray_started": bool(ray is not None and ray.is_initialized()),
        "modules": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY),
    }, f)
""".replace("HEAVY", repr(HEAVY))


@dataclasses.dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    ray_started: bool
    modules: list[str]

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.splitlines()


def exit_status(main, argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse raises it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def unitpipe(*argv: str, timeout: float = 120, env: dict | None = None) -> Run:
    """``unitpipe ARGV...`` in a fresh interpreter, run from the repository root."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        environment = dict(os.environ, PYTHONPATH=REPO, CLI_RUN_OUT=out, **(env or {}))
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, *argv],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=environment,
            timeout=timeout,
        )
        assert os.path.exists(out), done.stderr[-3000:]
        with open(out) as f:
            probe = json.load(f)
    return Run(probe["code"], done.stdout, done.stderr, probe["ray_started"], probe["modules"])
