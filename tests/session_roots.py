"""Roots built once per test session and copied for each module that asks.

Building a small root (shard, extract, fit, label on Ray) costs a module 15-20 s; modules that
read the same kind of root share one build and each get a copy of their own, so a test may
label into it, delete or damage files without touching another module's root.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

_BUILT: dict[tuple[str, str], str] = {}


def session_copy(tmp_path_factory, request, name: str, build: Callable[[str], str]) -> str:
    """A fresh copy of the session's root ``name`` (``build(directory)`` on first use, which
    returns the root's path); returns the copy's path.

    The first call runs ``build`` on Ray: it asks for the calling module's ``ray_local``
    (through ``request``, the fixture's) unless a Ray runs already, so a module that only
    reads the root starts no Ray when another module built it first.
    """
    built = (str(tmp_path_factory.getbasetemp()), name)
    if built not in _BUILT:
        import ray

        if not ray.is_initialized():
            request.getfixturevalue("ray_local")
        _BUILT[built] = build(str(tmp_path_factory.mktemp(f"{name}-template")))
    copy = str(tmp_path_factory.mktemp(name))
    shutil.copytree(_BUILT[built], copy, symlinks=True, dirs_exist_ok=True)
    return copy
