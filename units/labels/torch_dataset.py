"""A PyTorch dataset of audio and unit labels for HuBERT-style training.

:class:`UnitDataset` streams the committed label shards of ``ROOT/labels/NAME`` together with
their audio shards, key by key, and yields ``{"key", "waveform", "units", "start"}``.
:class:`LengthBatches` groups those samples into batches of similar length with padding
masks. Crops follow fairseq's ``HubertDataset``: the label crop follows the audio crop at the
label rate (``collater_frm_label``).

Work is split by shard: shard ``i`` of an epoch's (seeded) shard order goes to the
(rank, DataLoader worker) pair ``i % (world_size * num_workers)``, so every labelled
utterance is read exactly once per epoch, whatever the number of ranks and workers.

Example:
    >>> from torch.utils.data import DataLoader
    >>> data = UnitDataset("/data/ls", "km500", max_samples=250_000)  # doctest: +SKIP
    >>> loader = DataLoader(  # doctest: +SKIP
    ...     LengthBatches(data, max_tokens=1_400_000), batch_size=None, num_workers=2
    ... )
    >>> for epoch in range(2):  # doctest: +SKIP
    ...     data.set_epoch(epoch)  # before iterating: workers get a fresh copy each epoch
    ...     for batch in loader:
    ...         batch["waveforms"], batch["padding_mask"], batch["units"]
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards.core import storage
from shards.reader import decode_member, iter_members
from shards.root import RootLayout
from units.labels.model import label_layout

log = logging.getLogger(__name__)


class LabelMismatchError(ValueError):
    """Labels that disagree with themselves or with their audio shard."""


def label_span(
    start: int, num_samples: int, label_rate: float, sample_rate: int, available: int
) -> tuple[int, int]:
    """The label frames that cover audio ``[start, start + num_samples)``, as fairseq.

    ``frm_start = int(round(start * label_rate / sample_rate))`` and ``frm_size =
    int(round(num_samples * label_rate / sample_rate))``, cut to the ``available`` frames
    after ``frm_start`` (fairseq's ``collater_frm_label``). Python's ``round`` rounds halves
    to even, as fairseq does: 2.5 frames is 2.

    Example:
        >>> label_span(321, 32_000, 50, 16_000, available=100)
        (1, 99)
    """
    s2f = label_rate / sample_rate
    frm_start = int(round(start * s2f))
    frm_size = min(int(round(num_samples * s2f)), available - frm_start)
    return frm_start, max(frm_size, 0)


def crop(
    waveform,
    units,
    max_samples: int,
    label_rate: float,
    rng: np.random.Generator | None,
    sample_rate: int = 16_000,
):
    """Crops a waveform to ``max_samples`` and its units to the same span.

    A waveform of ``max_samples`` or fewer is returned whole with start 0. A longer one is
    cut at ``start = rng.integers(0, diff + 1)`` (fairseq's ``np.random.randint(0, diff +
    1)``), or at 0 when ``rng`` is None (``random_crop=False``); the units are cut with
    :func:`label_span`.

    Args:
        waveform: Audio samples (a 1-D array or tensor).
        units: Label frames of the whole waveform (a 1-D array or tensor).
        max_samples: The longest waveform to keep.
        label_rate: Label frames per second (100 for MFCC, 50 for HuBERT layers).
        rng: Where the crop start is drawn from; None for a crop at 0.
        sample_rate: Audio samples per second.

    Returns:
        ``(waveform, units, start)``: the cropped pieces and the first kept sample.

    Example:
        >>> wav, units, start = crop(np.zeros(800), np.arange(5), 320, 100, None)
        >>> len(wav), units.tolist(), start
        (320, [0, 1], 0)
    """
    diff = len(waveform) - max_samples
    if diff <= 0:
        return waveform, units, 0
    start = int(rng.integers(0, diff + 1)) if rng is not None else 0
    frm_start, frm_size = label_span(start, max_samples, label_rate, sample_rate, len(units))
    return (
        waveform[start : start + max_samples],
        units[frm_start : frm_start + frm_size],
        start,
    )


def seeded_rng(*parts) -> np.random.Generator:
    """A generator seeded by ``parts`` (a purpose, the seed, the epoch, a key ...): the same
    draws in every process, so shard orders and crops repeat across DataLoader workers,
    ranks and reruns, and the webdataset pipeline (:mod:`units.labels.streaming`) draws the
    same ones."""
    # Seeded from a digest rather than hash(): Python salts str hashes per process, and
    # DataLoader workers are processes, so hash() would give each rerun other crops.
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def _shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """``items`` in random order through a buffer of at most ``size`` items."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _default_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def read_shard_labels(path: str) -> dict[str, tuple[np.ndarray, float]]:
    """``key -> (units, label rate)`` of one label shard, local or remote.

    Raises:
        LabelMismatchError: A row whose units disagree with its ``frames``.
    """
    table = storage.read_parquet(path, columns=["key", "units", "frames", "frame_rate"])
    units = table.column("units").combine_chunks()
    offsets = units.offsets.to_numpy()
    values = units.values.to_numpy()
    keys_ = table.column("key").to_pylist()
    frames = table.column("frames").to_numpy()
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != frames)
    if len(bad):
        i = int(bad[0])
        raise LabelMismatchError(
            f"{path}: key {keys_[i]!r} has {lengths[i]} units but frames={frames[i]} "
            f"({len(bad)} such keys); the label shard is damaged: delete it and its "
            "commit record and relabel"
        )
    rates = table.column("frame_rate").to_numpy()
    return {
        key: (values[offsets[i] : offsets[i + 1]], float(rates[i])) for i, key in enumerate(keys_)
    }


class UnitDataset(IterableDataset):
    """Audio with its unit labels, streamed shard by shard, each utterance once per epoch.

    Only label shards with a commit record are read, each with the audio shard of the same
    name. Audio members without labels (the label pass's rejects, usually members that fail
    to decode) are skipped without being decoded; :attr:`unlabelled` counts them.

    Each epoch the shard order is shuffled with ``(seed, epoch)``, identically on every
    rank, and shard ``i`` goes to the (rank, worker) pair ``i % (world_size *
    num_workers)``. Ranks and workers therefore see different numbers of samples when shards
    hold different numbers of utterances (or when there are fewer shards than pairs, some
    get none). Nothing is dropped to even them out: a DDP trainer either stops every rank
    after ``min(dataset.utterances_per_rank(num_workers))`` samples, or wraps its loop in
    ``torch.distributed.algorithms.Join`` so that ranks that finish early keep answering
    the others' collectives; many shards per (rank, worker) pair keep the imbalance small.

    Within a shard, samples pass through a shuffle buffer of ``shuffle_buffer`` samples,
    seeded by ``(seed, epoch, shard)``. Crops are drawn from ``(seed, epoch, key)``, so a
    rerun with the same seed and epoch gives the same crops in any worker layout.

    Args:
        root: The dataset root.
        labels: The label set's name (``ROOT/labels/NAME``).
        max_samples: Crop longer waveforms to this many samples; None keeps them whole.
        random_crop: Draw the crop start at random; False crops at sample 0 (fairseq).
        shuffle: Shuffle the shard order and samples within shards.
        seed: Seed of every shuffle and crop.
        shuffle_buffer: Samples held for shuffling within a shard, per worker. Memory per
            worker is about this many (cropped) waveforms.
        rank: This process's rank; defaults to torch.distributed's, or 0.
        world_size: Number of ranks; defaults to torch.distributed's, or 1.

    Raises:
        ValueError: Bad arguments, or no committed label shard.
        FileNotFoundError: A label shard without its audio shard.

    Example:
        >>> data = UnitDataset("/data/ls", "km500", max_samples=250_000)  # doctest: +SKIP
        >>> sample = next(iter(data))  # doctest: +SKIP
        >>> sample["key"], sample["waveform"].shape, sample["units"].shape  # doctest: +SKIP
        ('103-1240-0003', torch.Size([250000]), torch.Size([781]))
    """

    def __init__(
        self,
        root: str,
        labels: str,
        *,
        max_samples: int | None = None,
        random_crop: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 64,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples} should be >= 1 or None")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} should be >= 1")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is None:
            # Resolved here, in the main process: DataLoader workers may not share its
            # torch.distributed state.
            rank, world_size = _default_rank()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} should be in [0, world_size={world_size})")
        self.root = RootLayout(root).root
        self.layout = label_layout(self.root, labels)
        self.max_samples = max_samples
        self.random_crop = random_crop
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._records = self._committed()
        self.shards = sorted(self._records)
        #: Labelled utterances in all committed shards (what one epoch yields over all ranks).
        self.utterances = sum(r["utterances"] for r in self._records.values())
        #: Audio members of those shards without labels, skipped every epoch.
        self.unlabelled = sum(r["rejects"] for r in self._records.values())

    def _committed(self) -> dict[str, dict]:
        names = [
            os.path.basename(p)[: -len(".json")]
            for p in glob.glob(os.path.join(self.layout.directory, "commits", "*.json"))
        ]
        records = {n: r for n in names if (r := self.layout.read_commit(n)) is not None}
        if not records:
            raise ValueError(
                f"no committed label shard in {self.layout.directory}: run "
                f"`python -m pipelines.label --root {self.root} --name {self.layout.name}` first"
            )
        for name in records:
            if not os.path.exists(self._audio_path(name)):
                raise FileNotFoundError(
                    f"label shard {name} of {self.layout.name!r} has no audio shard "
                    f"{self._audio_path(name)}"
                )
        return records

    def _audio_path(self, shard: str) -> str:
        return os.path.join(RootLayout(self.root).shards_dir, f"{shard}.tar")

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the shuffles and crops; call it before each epoch.

        With ``persistent_workers=True`` the workers keep the copy they were started with,
        so the epoch (and the shuffles) would not change: leave it False.
        """
        self.epoch = epoch

    def _order(self) -> list[str]:
        if not self.shuffle:
            return list(self.shards)
        perm = seeded_rng("shards", self.seed, self.epoch).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def shards_for(self, rank: int, worker: int, num_workers: int) -> list[str]:
        """The shards (rank, worker) reads this epoch, in the order it reads them."""
        slot, total = rank * num_workers + worker, self.world_size * num_workers
        return self._order()[slot::total]

    def utterances_per_rank(self, num_workers: int) -> list[int]:
        """Labelled utterances each rank reads this epoch, with ``num_workers`` per rank."""
        return [
            sum(
                self._records[s]["utterances"]
                for w in range(num_workers)
                for s in self.shards_for(r, w, num_workers)
            )
            for r in range(self.world_size)
        ]

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        for shard in self.shards_for(self.rank, worker, num_workers):
            samples = self._read_shard(shard)
            if self.shuffle:
                samples = _shuffled(
                    samples, self.shuffle_buffer, seeded_rng("buffer", self.seed, self.epoch, shard)
                )
            yield from samples

    def _read_labels(self, shard: str) -> dict[str, tuple[np.ndarray, float]]:
        return read_shard_labels(self.layout.shard_path("units", shard))

    def _read_shard(self, shard: str) -> Iterator[dict]:
        labels = self._read_labels(shard)
        path = self._audio_path(shard)
        skipped = 0
        for key, flac in iter_members(path):
            if key not in labels:
                skipped += 1
                continue
            units, rate = labels.pop(key)
            # Decoded as every stage does; iter_shard is not used because it decodes every
            # member, and the unlabelled ones are mostly those that fail to decode.
            wav, sample_rate = decode_member(flac)
            start = 0
            if self.max_samples is not None:
                rng = seeded_rng("crop", self.seed, self.epoch, key) if self.random_crop else None
                wav, units, start = crop(wav, units, self.max_samples, rate, rng, sample_rate)
            yield {
                "key": key,
                "waveform": torch.from_numpy(np.ascontiguousarray(wav)),
                "units": torch.from_numpy(units.astype(np.int64)),
                "start": start,
            }
        if labels:
            raise LabelMismatchError(
                f"label shard {shard} of {self.layout.name!r} has keys that are not in "
                f"{path}: {sorted(labels)[:5]}; the labels belong to another root"
            )
        log.debug("shard %s: %d audio members without labels skipped", shard, skipped)


def collate(samples: list[dict], pad_unit: int = -100) -> dict:
    """Pads samples of :class:`UnitDataset` into one batch.

    Args:
        samples: Dicts with ``key``, ``waveform``, ``units`` and ``start``.
        pad_unit: The unit value after each sample's units; -100 is
            ``torch.nn.functional.cross_entropy``'s default ``ignore_index``.

    Returns:
        ``keys`` (list), ``waveforms`` (B, T) float32 zero-padded, ``padding_mask`` (B, T)
        bool, True at padding (fairseq's convention), ``lengths`` (B,) samples, ``units``
        (B, U) int64 padded with ``pad_unit``, ``unit_lengths`` (B,), ``starts`` (B,) crop
        starts.

    Example:
        >>> a = {"key": "a", "waveform": torch.ones(3), "units": torch.tensor([4]), "start": 0}
        >>> b = {"key": "b", "waveform": torch.ones(1), "units": torch.tensor([]), "start": 0}
        >>> batch = collate([a, b])
        >>> batch["padding_mask"].tolist(), batch["units"].tolist()
        ([[False, False, False], [False, True, True]], [[4], [-100]])
    """
    lengths = torch.tensor([len(s["waveform"]) for s in samples], dtype=torch.int64)
    unit_lengths = torch.tensor([len(s["units"]) for s in samples], dtype=torch.int64)
    batch, width = len(samples), int(lengths.max())
    waveforms = torch.zeros(batch, width, dtype=torch.float32)
    units = torch.full((batch, int(unit_lengths.max())), pad_unit, dtype=torch.int64)
    for i, s in enumerate(samples):
        waveforms[i, : len(s["waveform"])] = s["waveform"]
        units[i, : len(s["units"])] = s["units"]
    return {
        "keys": [s["key"] for s in samples],
        "waveforms": waveforms,
        "padding_mask": torch.arange(width)[None, :] >= lengths[:, None],
        "lengths": lengths,
        "units": units,
        "unit_lengths": unit_lengths,
        "starts": torch.tensor([s["start"] for s in samples], dtype=torch.int64),
    }


def pack(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Groups indices into batches by length so that ``longest * count <= max_tokens``.

    Indices are taken shortest first; a batch closes when the next sample would push its
    padded size over ``max_tokens``. A sample longer than ``max_tokens`` is a batch alone.

    Example:
        >>> pack([5, 1, 4, 2, 9], max_tokens=8)
        [[1, 3], [2], [0], [4]]
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class LengthBatches(IterableDataset):
    """Padded batches of similar length from a :class:`UnitDataset`.

    Samples are buffered ``buffer`` at a time, grouped with :func:`pack` so that each
    batch's padded size (longest waveform × batch size) stays at or under ``max_tokens``
    (fairseq's ``max_tokens``, in samples), and yielded through :func:`collate`. With a
    shuffling dataset the batches of each buffer come out in a seeded random order, so that
    lengths do not rise steadily within a buffer. Use it with ``batch_size=None``.

    Args:
        dataset: The samples.
        max_tokens: Most padded audio samples per batch.
        buffer: Samples held for sorting, per worker.
        pad_unit: Unit padding value (see :func:`collate`).

    Example:
        >>> data = UnitDataset("/data/ls", "km500", max_samples=250_000)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(  # doctest: +SKIP
        ...     LengthBatches(data, max_tokens=1_400_000), batch_size=None, num_workers=2
        ... )
    """

    def __init__(
        self, dataset: UnitDataset, *, max_tokens: int, buffer: int = 128, pad_unit: int = -100
    ):
        if max_tokens < 1 or buffer < 1:
            raise ValueError(f"max_tokens={max_tokens} and buffer={buffer} should be >= 1")
        self.dataset = dataset
        self.max_tokens = max_tokens
        self.buffer = buffer
        self.pad_unit = pad_unit

    def set_epoch(self, epoch: int) -> None:
        """Sets the wrapped dataset's epoch."""
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        d = self.dataset
        worker, _ = d._worker()
        rng = seeded_rng("batches", d.seed, d.epoch, d.rank, worker) if d.shuffle else None
        pending: list[dict] = []
        for sample in d:
            pending.append(sample)
            if len(pending) == self.buffer:
                yield from self._flush(pending, rng)
                pending = []
        yield from self._flush(pending, rng)

    def _flush(self, samples: list[dict], rng: np.random.Generator | None) -> Iterator[dict]:
        batches = pack([len(s["waveform"]) for s in samples], self.max_tokens)
        order = rng.permutation(len(batches)) if rng is not None else range(len(batches))
        for b in order:
            yield collate([samples[i] for i in batches[b]], self.pad_unit)
