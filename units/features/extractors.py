"""Extractors by name (``mfcc``, ``fbank``, ``hf:PATH``, ``fairseq:PATH``,
``python:MODULE:CALLABLE``): what one computes, and building it.

:func:`describe` says what an extractor computes, its
:class:`~units.features.extractor.FeatureSpec`, from the name and the layer alone: a constant
for MFCC and filterbanks, the configuration (and the weights' sha256) for an SSL checkpoint.
It builds no network and loads no weights, so the driver can check a request and plan with
its spec cheaply. :func:`build` makes the extractor, whose ``spec`` is the same. Options
travel to Ray workers as the small :class:`ExtractorOptions`; every worker builds its own
extractor (one model load per worker), never a pickled model.

``python:MODULE:CALLABLE`` is the hook for any other model: ``CALLABLE(options)`` returns an
object that follows the :class:`~units.features.extractor.Extractor` protocol (see
:func:`build_hook`).

This module imports nothing heavy at import time (the command line reads
:class:`ExtractorOptions`'s defaults without numpy or torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from units.features.extractor import Extractor, FeatureSpec


class ExtractorError(ValueError):
    """An extractor that cannot be built (unknown name, bad checkpoint, layer out of range)."""


@dataclasses.dataclass(frozen=True)
class ExtractorOptions:
    """Which extractor, and how it runs.

    ``extractor``, ``checkpoint`` and ``layer`` say what is computed, and are the
    :class:`~units.features.extractor.FeatureSpec` fields of the same names
    (:meth:`from_spec`); ``device``, ``dtype``, ``threads`` and ``batch_seconds`` say how,
    which moves features within float rounding only.

    Attributes:
        extractor: ``mfcc``, ``fbank``, ``hf``, ``fairseq`` or ``python``. Given as the
            command line's ``hf:PATH``, ``fairseq:PATH`` or ``python:MODULE:CALLABLE``, it is
            split: what follows the first colon goes to ``checkpoint``.
        layer: Transformer block, counted from 1 (SSL extractors only).
        device: ``cpu`` or ``cuda``.
        dtype: ``bf16`` or ``fp16`` autocast on CUDA; ``None`` for float32.
        threads: CPU threads for torch (``None``: torch's default).
        batch_seconds: Audio per batch: the stages cut a shard's rows at this many seconds,
            and an SSL model pads its windows up to it. The one default of the project.
        checkpoint: Local model path (``hf``: a directory, ``fairseq``: a ``.pt``), or
            ``MODULE:CALLABLE`` for ``python``.
        bucket_seconds: Audio a stage hands the extractor at once (see :attr:`bucket`),
            which an SSL model sorts by length into batches of ``batch_seconds``: the larger
            the bucket, the less padding. ``None``: one batch on CPU, where padding costs
            little against a small batch's cache hits, and ``GPU_BUCKET_BATCHES`` batches on
            CUDA (2-20 s utterances: 24% of the samples run are padding in one 120 s bucket,
            7% in 960 s).
        extra_layers: Other transformer blocks the SSL extractor also returns from the same
            forward pass (:meth:`units.features.ssl.SSLExtractor.layers_on_device`): label
            sets of several layers of one model in one pass.

    Example:
        >>> ExtractorOptions("hf:/models/hubert", layer=6) == ExtractorOptions(
        ...     "hf", layer=6, checkpoint="/models/hubert"
        ... )
        True
    """

    extractor: str
    layer: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    batch_seconds: float = 120.0
    checkpoint: str | None = None
    bucket_seconds: float | None = None
    extra_layers: tuple[int, ...] = ()

    def __post_init__(self):
        kind, colon, path = self.extractor.partition(":")
        if colon and self.checkpoint is None:
            # Kept as two fields from here on: nothing joins and splits them again.
            object.__setattr__(self, "extractor", kind)
            object.__setattr__(self, "checkpoint", path)

    @classmethod
    def from_spec(cls, spec: FeatureSpec, **runtime) -> ExtractorOptions:
        """The options that rebuild the extractor ``spec`` records (a k-means's, say).

        Args:
            spec: What to compute: its extractor, checkpoint and layer.
            **runtime: ``device``, ``dtype``, ``threads``, ``batch_seconds``.
        """
        return cls(spec.extractor, layer=spec.layer, checkpoint=spec.checkpoint, **runtime)

    @property
    def bucket(self) -> float:
        """Audio seconds the stages cut a shard's rows at: ``bucket_seconds``, or its default
        for ``device``. A rule of the options alone, so a shard's buckets are the same on
        every worker of a run (README, "Determinism")."""
        if self.bucket_seconds is not None:
            return self.bucket_seconds
        return self.batch_seconds * (GPU_BUCKET_BATCHES if self.device.startswith("cuda") else 1)

    @property
    def name(self) -> str:
        """The command line's name, ``mfcc`` or ``hf:PATH``: for messages."""
        return self.extractor if self.checkpoint is None else f"{self.extractor}:{self.checkpoint}"


#: Batches per bucket on CUDA (:attr:`ExtractorOptions.bucket`): 960 s of audio, 60 MB of
#: float32 samples and ~150 MB of 768-d features per call.
GPU_BUCKET_BATCHES = 8

_KALDI = ("mfcc", "fbank")
_SSL = ("hf", "fairseq")
_HOOK = "python"


def describe(options: ExtractorOptions) -> FeatureSpec:
    """What the extractor ``options`` names computes, without building it.

    ``mfcc`` and ``fbank`` are constants; an SSL checkpoint's spec comes from its
    configuration and the sha256 of its weights, which is all that is read
    (:func:`units.features.ssl.describe_hf`,
    :func:`units.features.fairseq_checkpoint.describe_fairseq`). It equals
    ``build(options).spec``. Weights that do not load surface at :func:`build` only.

    Raises:
        ExtractorError: Unknown extractor, missing or unreadable checkpoint, unsupported
            model, layer out of range; the messages of :func:`build`.
    """
    _check(options)
    if options.extractor in _KALDI:
        from units.features.extractor import FBANK_SPEC, MFCC_SPEC

        return MFCC_SPEC if options.extractor == "mfcc" else FBANK_SPEC
    if options.extractor == _HOOK:
        return build_hook(options).spec  # A hook says what it computes only once built.
    with _extractor_errors():
        if options.extractor == "hf":
            from units.features.ssl import describe_hf

            return describe_hf(options.checkpoint, options.layer)
        from units.features.fairseq_checkpoint import describe_fairseq

        return describe_fairseq(options.checkpoint, options.layer)


def build(options: ExtractorOptions) -> Extractor:
    """Builds the extractor ``options`` names.

    Raises:
        ExtractorError: Unknown extractor, missing or bad checkpoint, layer out of range.
    """
    _check(options)
    if options.extractor in _KALDI:
        from units.features.kaldi import KaldiFbank, KaldiMFCC

        cls = KaldiMFCC if options.extractor == "mfcc" else KaldiFbank
        return cls(device=options.device)
    if options.extractor == _HOOK:
        return build_hook(options)
    from units.features import ssl

    with _extractor_errors():
        if options.extractor == "hf":
            model = ssl.load_hf(options.checkpoint, device=options.device)
        else:
            from units.features.fairseq_checkpoint import load_fairseq

            model = ssl.from_fairseq(load_fairseq(options.checkpoint, device=options.device))
        return ssl.SSLExtractor(
            model,
            options.layer,
            device=options.device,
            dtype=options.dtype,
            batch_seconds=options.batch_seconds,
            threads=options.threads,
            extra_layers=options.extra_layers,
        )


def _check(options: ExtractorOptions) -> None:
    """What the name and the layer alone say: a known extractor, a path and a layer for
    an SSL model, no layer for the others."""
    kind = options.extractor
    if kind in _KALDI:
        if options.layer is not None or options.extra_layers:
            raise ExtractorError(f"--layer applies to SSL models, not to {kind}")
        return
    if kind == _HOOK:
        module, colon, name = (options.checkpoint or "").partition(":")
        if not (module and colon and name):
            raise ExtractorError(
                f"{options.name!r}: give the factory as python:MODULE:CALLABLE, "
                "e.g. python:my_models.cpc:build"
            )
        return
    if kind not in _SSL:
        raise ExtractorError(
            f"unknown extractor {options.name!r}; use mfcc, fbank, hf:PATH, fairseq:PATH "
            "or python:MODULE:CALLABLE"
        )
    if not options.checkpoint:
        raise ExtractorError(f"{kind}: give a local path, as {kind}:/path/to/model")
    if options.layer is None:
        raise ExtractorError(f"{kind}: give --layer (a transformer block, counted from 1)")


@contextlib.contextmanager
def _extractor_errors() -> Iterator[None]:
    """The loaders' errors (missing files, layer range, ...) as :class:`ExtractorError`."""
    try:
        yield
    except ExtractorError:
        raise
    except (ValueError, OSError) as e:
        raise ExtractorError(str(e)) from e


def build_hook(options: ExtractorOptions) -> Extractor:
    """The extractor of ``python:MODULE:CALLABLE``: ``CALLABLE(options)``, checked and named.

    The callable gets the :class:`ExtractorOptions` (its ``layer``, ``device``, ``dtype``,
    ``threads`` and ``batch_seconds``) and returns an object with a ``spec``
    (:class:`~units.features.extractor.FeatureSpec`: at least ``dim``, ``window`` and ``hop``,
    the frame contract its frames keep) and ``__call__(waveforms) -> list of (T, dim)
    float32 arrays``. The module must be importable on every Ray worker (installed, or in
    the job's ``working_dir``). Importing it runs its code: a hook is code the user chose to
    run, as with any Python package, never something read from data.

    The spec it returns is recorded with ``extractor="python"``, ``checkpoint`` the hook's
    ``MODULE:CALLABLE`` (so the k-means and the label pass rebuild the same hook from it),
    ``checkpoint_sha256`` the sha256 of the module's source file and ``layer`` the options'.
    Every call is checked against the protocol: one array per waveform, ``spec.dim``
    columns, exactly the contract's frame count.

    Raises:
        ExtractorError: The module or callable cannot be found, or the object it returns
            does not follow the protocol.
    """
    import hashlib
    import importlib

    from units.features.extractor import FeatureSpec

    module_name, _, attribute = options.checkpoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ExtractorError(
            f"python:{options.checkpoint}: cannot import {module_name!r} ({e}); it must be "
            "importable on the driver and on every worker (pip install it, or ship it with "
            "ray job submit --working-dir)"
        ) from e
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ExtractorError(
            f"python:{options.checkpoint}: {module_name} has no callable {attribute!r}"
        )
    inner = factory(options)
    spec = getattr(inner, "spec", None)
    if not isinstance(spec, FeatureSpec) or not callable(inner):
        raise ExtractorError(
            f"python:{options.checkpoint} returned {type(inner).__name__}, which is not an "
            "extractor: it needs a FeatureSpec `spec` and __call__(waveforms) -> arrays"
        )
    source = getattr(module, "__file__", None)
    digest = None
    if source is not None:
        with open(source, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    named = dataclasses.replace(
        spec,
        extractor=_HOOK,
        checkpoint=options.checkpoint,
        checkpoint_sha256=digest,
        layer=options.layer,
    )
    return _CheckedHook(named, inner, options.name)


class _CheckedHook:
    """A hook's extractor under the spec that names it, each call checked against the
    :class:`~units.features.extractor.Extractor` protocol (code outside this project: a wrong
    frame count would otherwise surface as a misaligned label much later)."""

    def __init__(self, spec: FeatureSpec, inner: Extractor, name: str):
        self.spec = spec
        self._inner = inner
        self._name = name

    def __call__(self, waveforms):
        import numpy as np

        out = self._inner(waveforms)
        if len(out) != len(waveforms):
            raise ExtractorError(
                f"{self._name}: {len(out)} feature arrays for {len(waveforms)} waveforms"
            )
        checked = []
        for wav, feats in zip(waveforms, out, strict=True):
            feats = np.asarray(feats)
            want = (self.spec.contract.frames(len(wav)), self.spec.dim)
            if feats.shape != want:
                raise ExtractorError(
                    f"{self._name}: features of shape {feats.shape} for {len(wav)} samples; "
                    f"the spec's frame contract (window {self.spec.window}, hop "
                    f"{self.spec.hop}) and dim give {want}"
                )
            checked.append(np.ascontiguousarray(feats, dtype=np.float32))
        return checked
