"""The ``shards`` package's names, imported when first asked for: a process that needs one
small module (a k-means actor) does not pay for pyarrow and the reader."""

from __future__ import annotations

import pytest

import shards
from shards import plan, reader
from tests.processes import run_fresh_python


def test_the_package_names_are_the_modules_own():
    assert shards.Index is reader.Index and shards.open is reader.open_shards
    assert shards.ShardingOptions is plan.ShardingOptions
    from shards import get, parse_size

    assert get is reader.get and parse_size is plan.parse_size
    assert {"Index", "Sample", "ShardingOptions", "get", "iter_shard", "open"} <= set(dir(shards))
    with pytest.raises(AttributeError, match="no attribute 'Indx'"):
        shards.Indx  # noqa: B018 - the lookup is the test.


@pytest.mark.parametrize("module", ["units.kmeans.transport", "shards.core.threads"])
def test_a_k_means_actor_imports_no_pyarrow(module):
    """What a k-means actor's process imports before its first call (0.12 s of CPU less
    per actor on the 2-core EPYC than with pyarrow and the shard reader)."""
    code = (
        f"import sys, {module}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'pyarrow', 'soundfile'})\n"
        "print(','.join(heavy))"
    )
    out = run_fresh_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
