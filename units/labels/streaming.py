"""A webdataset pipeline of audio and unit labels, from a local root or ``s3://``.

:func:`unit_pipeline` builds a :class:`webdataset.DataPipeline` that yields what
:class:`units.labels.torch_dataset.UnitDataset` yields (``{"key", "waveform", "units",
"start"}``, the same samples, units and crops), built from webdataset's own stages so that a
trainer can append more (``wds.shuffle``, ``wds.batched``, its own ``wds.map``)::

    LabelledShards      {"url", "shard"}: each committed label shard's audio tar, in the
                        epoch's seeded order (the same on every rank)
    split_by_rank       wds.split_by_node, with the rank fixed when the pipeline is built
    wds.split_by_worker
    LabelledMembers     per shard, in the worker: its label Parquet read once, its tar opened
                        (pyarrow, streaming) and split by webdataset's tar_file_expander and
                        group_by_keys; members without labels skipped undecoded
    DecodeAndCrop       decode, check the frame contract, fairseq crop, torch tensors

Shard ``i`` of the epoch's order goes to rank ``i % world_size`` and, within it, to worker
``(i // world_size) % num_workers``, so ranks x workers partition the shards and every
labelled utterance is read exactly once per epoch.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from shards import keys
from shards.core import storage
from shards.core.atomic import read_json
from shards.core.outputs import OutputLayout
from shards.reader import UnsafeMemberError, decode_member
from shards.root import RootLayout
from units.features.extractor import FeatureSpec
from units.features.frames import FrameContract
from units.labels.model import label_layout
from units.labels.torch_dataset import LabelMismatchError, crop, read_shard_labels, seeded_rng

log = logging.getLogger(__name__)


def unit_pipeline(
    root: str,
    labels: str,
    *,
    max_samples: int | None = None,
    random_crop: bool = True,
    shuffle_shards: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    empty_check: bool = True,
) -> UnitPipeline:
    """A webdataset pipeline of the label set ``ROOT/labels/NAME`` with its audio.

    Only label shards with a commit record are read, each with the audio shard of the same
    name. Samples are ``{"key", "waveform" (float32), "units" (int64), "start"}``, exactly
    :class:`~units.labels.torch_dataset.UnitDataset`'s: the crop start is drawn from
    ``(seed, epoch, key)`` and the units are cut with fairseq's rule (:func:`crop`), at the
    rate the label set stored (its frame contract's; there is no ``label_rate`` argument, as
    any other rate would cut the wrong frames).

    Audio members without labels (the label pass's rejects) are skipped without being
    decoded; :attr:`UnitPipeline.unlabelled` counts them.

    Args:
        root: The dataset root, a local path or ``s3://bucket/prefix``.
        labels: The label set's name (``ROOT/labels/NAME``).
        max_samples: Crop longer waveforms to this many samples; None keeps them whole.
        random_crop: Draw the crop start at random; False crops at sample 0 (fairseq).
        shuffle_shards: Read the shards in an order drawn from ``(seed, epoch)``; False
            reads them in stored order. Samples within a shard come in stored order: append
            ``wds.shuffle(n)`` to mix them.
        seed: Seed of the shard order and the crops.
        epoch: The first epoch; :meth:`UnitPipeline.set_epoch` moves it.
        rank: This process's rank. By default the one webdataset's ``split_by_node`` would
            use (``RANK``/``WORLD_SIZE`` in the environment, else torch.distributed's, else
            0 of 1), resolved here, in the calling process.
        world_size: Number of ranks; give both or neither.
        empty_check: Raise when some (rank, worker) pair would read no shard, as
            webdataset's ``WebDataset(empty_check=True)`` does; False only logs a warning.

    Returns:
        The pipeline; iterate it, or hand it to a ``torch.utils.data.DataLoader``.

    Raises:
        ValueError: Bad arguments, no committed label shard, or fewer shards than ranks.
        FileNotFoundError: A label shard without its audio shard.

    Example:
        >>> import webdataset as wds
        >>> from torch.utils.data import DataLoader
        >>> from units.labels.torch_dataset import collate
        >>> data = unit_pipeline("s3://bucket/ls", "km500", max_samples=250_000)  # doctest: +SKIP
        >>> data.append(wds.shuffle(1000))  # doctest: +SKIP
        >>> data.append(wds.batched(8, collation_fn=collate))  # doctest: +SKIP
        >>> loader = DataLoader(data, batch_size=None, num_workers=4)  # doctest: +SKIP
        >>> for epoch in range(2):  # doctest: +SKIP
        ...     data.set_epoch(epoch)  # before iterating: workers get a fresh copy each epoch
        ...     for batch in loader:
        ...         batch["waveforms"], batch["padding_mask"], batch["units"]
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples={max_samples} should be >= 1 or None")
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        # Resolved here, not by wds.split_by_node in each DataLoader worker: a worker started
        # with spawn or forkserver has no torch.distributed group, so there every rank would
        # be rank 0 of 1 and read every shard. The rules are webdataset's own.
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} should be in [0, world_size={world_size})")
    layout = label_layout(RootLayout(root).root, labels)
    shards = LabelledShards(
        layout,
        committed_shards(layout),
        shuffle=shuffle_shards,
        seed=seed,
        epoch=epoch,
        world_size=world_size,
        empty_check=empty_check,
    )
    shards.check_pairs(num_workers=1)  # Fewer shards than ranks: refused (or warned) now.
    decoder = DecodeAndCrop(
        frame_contract(layout), max_samples, random_crop=random_crop, seed=seed, epoch=epoch
    )
    return UnitPipeline(
        shards,
        functools.partial(split_by_rank, rank=rank, world_size=world_size),
        wds.split_by_worker,
        LabelledMembers(layout),
        decoder=decoder,
        rank=rank,
    )


class UnitPipeline(wds.DataPipeline):
    """The pipeline :func:`unit_pipeline` builds: a ``wds.DataPipeline`` with the label
    set's totals and :meth:`set_epoch`.

    Attributes:
        shards: The first stage (the label set's committed shards and their order).
        decoder: The last of its own stages (decoding and crops).
        rank: This pipeline's rank.
        world_size: Number of ranks.
        utterances: Labelled utterances in all committed shards (one epoch over all ranks).
        unlabelled: Audio members of those shards without labels, skipped every epoch.
    """

    def __init__(self, shards: LabelledShards, *stages, decoder: DecodeAndCrop, rank: int):
        super().__init__(shards, *stages, decoder)
        self.shards = shards
        self.decoder = decoder
        self.rank = rank
        self.world_size = shards.world_size
        self.utterances = sum(r["utterances"] for r in shards.records.values())
        self.unlabelled = sum(r["rejects"] for r in shards.records.values())

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the shard order and the crops; call it before each epoch.

        With ``persistent_workers=True`` the workers keep the copy they were started with,
        so the epoch would not change there: leave it False.
        """
        # Only this pipeline's own stages: a stage a user appended keeps its own epoch.
        self.shards.epoch = epoch
        self.decoder.epoch = epoch

    def shards_for(self, rank: int, worker: int, num_workers: int) -> list[str]:
        """The shards (rank, worker) reads this epoch, in the order it reads them."""
        return self.shards.order()[rank :: self.world_size][worker::num_workers]


def committed_shards(layout: OutputLayout) -> dict[str, dict]:
    """The commit records of a label set's committed shards, by shard name.

    Raises:
        ValueError: No committed shard.
        FileNotFoundError: A label shard without its audio shard.
    """
    names = [
        os.path.basename(p)[: -len(".json")]
        for p in storage.glob(os.path.join(layout.directory, "commits"), "*.json")
    ]
    # One small read and one size query per shard: concurrent, as on object storage each is
    # a round trip. map keeps the order, so the result does not depend on the threads.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        found = dict(zip(names, pool.map(layout.read_commit, names), strict=True))
    records = {name: record for name, record in found.items() if record is not None}
    if not records:
        raise ValueError(
            f"no committed label shard in {layout.directory}: run "
            f"`python -m pipelines.label --root {layout.root} --name {layout.name}` first"
        )
    audio = set(storage.listdir(RootLayout(layout.root).shards_dir))  # One listing, not N.
    for name in sorted(records):
        if f"{name}.tar" not in audio:
            raise FileNotFoundError(
                f"label shard {name} of {layout.name!r} has no audio shard "
                f"{audio_url(layout, name)}"
            )
    return records


def audio_url(layout: OutputLayout, shard: str) -> str:
    """The audio tar of ``shard`` (a local path or a URL, as the root is)."""
    return os.path.join(RootLayout(layout.root).shards_dir, f"{shard}.tar")


def frame_contract(layout: OutputLayout) -> FrameContract:
    """The framing of the label set's units, from the lineage its ``plan.json`` records.

    A k-means's units have its features' framing; a BEST-RQ quantizer's the stacked one.
    """
    plan = read_json(layout.path("plan.json"))
    if plan is None or "spec" not in plan:
        raise ValueError(
            f"{layout.path('plan.json')} is missing or names no feature spec: the label set "
            "was not written by `python -m pipelines.label`"
        )
    contract = FeatureSpec.from_json(plan["spec"]).contract
    if plan.get("target") == "bestrq":
        from units.bestrq.quantizer import stacked_contract

        contract = stacked_contract(contract, plan["stack"])
    return contract


def split_by_rank(src: Iterable, *, rank: int, world_size: int) -> Iterator:
    """``wds.split_by_node`` for a rank given when the pipeline was built: every
    ``world_size``-th item from ``rank``."""
    return itertools.islice(src, rank, None, world_size)


class LabelledShards(wds.pytorch.IterableDataset):
    """The pipeline's source: ``{"url", "shard"}`` for every committed label shard, in the
    epoch's order (shuffled with ``(seed, epoch)`` as UnitDataset does, so every rank and
    UnitDataset agree on it).

    Args:
        layout: The label set.
        records: Commit records by shard name (:func:`committed_shards`).
        shuffle: Shuffle the order each epoch; else stored order.
        seed: Seed of the order.
        epoch: Epoch of the order.
        world_size: Number of ranks, for :meth:`check_pairs`.
        empty_check: Raise, rather than warn, when a (rank, worker) pair would get no shard.
    """

    def __init__(
        self,
        layout: OutputLayout,
        records: dict[str, dict],
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        world_size: int,
        empty_check: bool,
    ):
        super().__init__()
        self.layout = layout
        self.records = records
        self.names = sorted(records)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.world_size = world_size
        self.empty_check = empty_check

    def order(self) -> list[str]:
        """The shard names in this epoch's order."""
        if not self.shuffle:
            return list(self.names)
        perm = seeded_rng("shards", self.seed, self.epoch).permutation(len(self.names))
        return [self.names[i] for i in perm]

    def check_pairs(self, num_workers: int) -> None:
        """Raises (or warns, without ``empty_check``) when some (rank, worker) pair of
        ``world_size`` ranks x ``num_workers`` workers would read no shard."""
        pairs = self.world_size * num_workers
        if len(self.names) >= pairs:
            return
        message = (
            f"{len(self.names)} label shards for {self.world_size} ranks x {num_workers} "
            f"workers: {pairs - len(self.names)} of the {pairs} (rank, worker) pairs would read "
            "nothing. Use fewer DataLoader workers or ranks, or more, smaller audio shards "
            "(`pipelines.shard --max-samples`); empty_check=False lets them read nothing"
        )
        if self.empty_check:
            raise ValueError(message)
        log.warning("%s", message)

    def __iter__(self) -> Iterator[dict]:
        # In the worker: its count is known only here (webdataset's rules, as split_by_worker).
        _, _, _, num_workers = wds.utils.pytorch_worker_info()
        self.check_pairs(num_workers)
        for shard in self.order():
            yield {"url": audio_url(self.layout, shard), "shard": shard}


def open_stream(url: str):
    """Opens a shard tar for streaming reads, local or on object storage.

    Through :func:`shards.core.storage.open_stream` (pyarrow, buffered), not webdataset's
    ``gopen``: webdataset 1.0's gopen has no ``s3://`` (it would take ``pipe:aws s3 cp ...``,
    a CLI per shard that the training nodes may not have, or s3fs, not a dependency), while
    pyarrow is how every stage reads a root and honours ``AWS_ENDPOINT_URL``.
    """
    return storage.open_stream(url)


def is_flac_member(name: str) -> bool:
    """True for a ``KEY.flac`` member; other members are skipped unread.

    Raises:
        UnsafeMemberError: A FLAC member whose name is not a plain ``KEY.flac``.
    """
    key, _, ext = name.partition(".")
    if ext != "flac":
        return False
    if "/" in name or "\\" in name or name.startswith((".", "-")):
        raise UnsafeMemberError(f"tar member {name!r} is not a plain KEY.flac file")
    try:
        keys.check(key)
    except ValueError as e:
        raise UnsafeMemberError(f"tar member {name!r}: {e}") from e
    return True


class LabelledMembers:
    """Stage: ``{"url", "shard"}`` -> ``{"__key__", "__url__", "flac", "units",
    "label_rate"}`` for each labelled FLAC member of each shard, in stored order.

    Per shard, the label Parquet is read once and the tar is split by webdataset's
    ``tar_file_expander`` and ``group_by_keys`` (``tarfile_to_samples`` without its
    gopen-based opener, see :func:`open_stream`). Nothing is extracted to disk; members that
    are not regular files are skipped by webdataset, FLAC members with unsafe names refused.

    Raises:
        LabelMismatchError: Labels for keys that the shard's tar does not hold.
    """

    def __init__(self, layout: OutputLayout):
        self.layout = layout

    def __call__(self, sources: Iterable[dict]) -> Iterator[dict]:
        for source in sources:
            yield from self._shard(source["url"], source["shard"])

    def _shard(self, url: str, shard: str) -> Iterator[dict]:
        labels = read_shard_labels(self.layout.shard_path("units", shard))
        skipped = 0
        with open_stream(url) as stream:
            members = tar_file_expander(
                [{"url": url, "stream": stream}], select_files=is_flac_member
            )
            for sample in group_by_keys(members):
                found = labels.pop(sample["__key__"], None)
                if found is None:
                    skipped += 1  # A label-pass reject: never decoded.
                    continue
                sample["units"], sample["label_rate"] = found
                yield sample
        if labels:
            raise LabelMismatchError(
                f"label shard {shard} of {self.layout.name!r} has keys that are not in "
                f"{url}: {sorted(labels)[:5]}; the labels belong to another root"
            )
        log.debug("shard %s: %d audio members without labels skipped", shard, skipped)


class DecodeAndCrop:
    """Stage: labelled members -> ``{"key", "waveform", "units", "start"}``.

    Decodes as every stage does (:func:`shards.reader.decode_member`), checks the units
    against the waveform's length by the label set's frame contract, and crops as
    :class:`~units.labels.torch_dataset.UnitDataset` does, from ``(seed, epoch, key)``.

    Raises:
        LabelMismatchError: Units that the waveform's frame count contradicts.
    """

    def __init__(
        self,
        contract: FrameContract,
        max_samples: int | None,
        *,
        random_crop: bool,
        seed: int,
        epoch: int,
    ):
        self.contract = contract
        self.max_samples = max_samples
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = epoch

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            yield self._one(sample)

    def _one(self, sample: dict) -> dict:
        key, units, rate = sample["__key__"], sample["units"], sample["label_rate"]
        wav, sample_rate = decode_member(sample["flac"])
        expected = self.contract.frames(len(wav))
        if len(units) != expected:
            raise LabelMismatchError(
                f"{sample['__url__']}: key {key!r} has {len(units)} units but its "
                f"{len(wav)} samples give {expected} frames (window {self.contract.window}, "
                f"hop {self.contract.hop}); the labels belong to other audio: relabel"
            )
        start = 0
        if self.max_samples is not None:
            rng = seeded_rng("crop", self.seed, self.epoch, key) if self.random_crop else None
            wav, units, start = crop(wav, units, self.max_samples, rate, rng, sample_rate)
        return {
            "key": key,
            "waveform": torch.from_numpy(np.ascontiguousarray(wav)),
            "units": torch.from_numpy(units.astype(np.int64)),
            "start": start,
        }
