"""Paths inside a dataset root (DESIGN.md, "the on-disk contract"), for the shard stage."""

from __future__ import annotations

import dataclasses
import os

from .core import storage
from .core.atomic import read_commit


@dataclasses.dataclass(frozen=True)
class RootLayout:
    """Where each file of the shard stage lives under ``root``.

    Example:
        >>> RootLayout("/data/ls").shard_path(3)
        '/data/ls/shards/000003.tar'
    """

    root: str

    def __post_init__(self):
        if not storage.is_url(self.root):
            object.__setattr__(self, "root", storage.local_path(self.root))
        else:
            object.__setattr__(self, "root", self.root.rstrip("/"))

    @property
    def shards_dir(self) -> str:
        return os.path.join(self.root, "shards")

    @property
    def manifest_dir(self) -> str:
        return os.path.join(self.root, "manifest")

    @property
    def parts_dir(self) -> str:
        return os.path.join(self.root, "manifest", "parts")

    @property
    def plan_dir(self) -> str:
        return os.path.join(self.root, "plan")

    def make_dirs(self) -> None:
        for d in (self.shards_dir, self.parts_dir, self.plan_dir):
            storage.makedirs(d)

    @staticmethod
    def shard_name(index: int) -> str:
        return f"{index:06d}"

    def shard_path(self, index: int) -> str:
        return os.path.join(self.shards_dir, f"{self.shard_name(index)}.tar")

    def commit_path(self, index: int) -> str:
        return os.path.join(self.parts_dir, f"{self.shard_name(index)}.commit.json")

    def utterances_part(self, index: int) -> str:
        return os.path.join(self.parts_dir, f"{self.shard_name(index)}.utterances.parquet")

    def rejects_part(self, index: int) -> str:
        return os.path.join(self.parts_dir, f"{self.shard_name(index)}.rejects.parquet")

    def manifest(self, name: str) -> str:
        return os.path.join(self.manifest_dir, name)

    def plan_path(self, name: str) -> str:
        return os.path.join(self.plan_dir, name)

    def read_commit(self, index: int) -> dict | None:
        """The commit record of shard ``index`` if the shard is committed and whole."""
        return read_commit(self.commit_path(index), self.shard_path(index))

    def temp_files(self) -> list[str]:
        """Leftovers of interrupted writers (hidden ``.NAME.tmp-*`` files)."""
        found = []
        for d in (self.shards_dir, self.parts_dir, self.manifest_dir, self.plan_dir):
            found.extend(storage.glob(d, ".*.tmp-*"))
        return sorted(found)
