"""Building an extractor from its name: ``mfcc``, ``fbank``, ``hf:PATH`` or ``fairseq:PATH``.

Options travel to Ray workers as this small dataclass; every worker builds its own extractor
(one model load per worker), never a pickled model.
"""

from __future__ import annotations

import dataclasses

from units.features.extractor import Extractor


class ExtractorError(ValueError):
    """An extractor that cannot be built (unknown name, bad checkpoint, layer out of range)."""


@dataclasses.dataclass(frozen=True)
class ExtractorOptions:
    """Which extractor, and how it runs.

    Attributes:
        extractor: ``mfcc``, ``fbank``, ``hf:PATH`` or ``fairseq:PATH``.
        layer: Transformer block, counted from 1 (SSL extractors only).
        device: ``cpu`` or ``cuda``.
        dtype: ``bf16`` or ``fp16`` autocast on CUDA; ``None`` for float32.
        threads: CPU threads for torch (``None``: torch's default).
        batch_seconds: Padded audio per batch.
    """

    extractor: str
    layer: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    batch_seconds: float = 120.0

    @property
    def kind(self) -> str:
        return self.extractor.split(":", 1)[0]

    @property
    def path(self) -> str | None:
        return self.extractor.split(":", 1)[1] if ":" in self.extractor else None


def build(options: ExtractorOptions) -> Extractor:
    """Builds the extractor ``options`` names.

    Raises:
        ExtractorError: Unknown extractor, missing or bad checkpoint, layer out of range.
    """
    kind = options.kind
    if kind in ("mfcc", "fbank"):
        if options.layer is not None:
            raise ExtractorError(f"--layer applies to SSL models, not to {kind}")
        from units.features.kaldi import KaldiFbank, KaldiMFCC

        cls = KaldiMFCC if kind == "mfcc" else KaldiFbank
        return cls(device=options.device)
    if kind in ("hf", "fairseq"):
        if not options.path:
            raise ExtractorError(f"{kind}: give a local path, as {kind}:/path/to/model")
        if options.layer is None:
            raise ExtractorError(f"{kind}: give --layer (a transformer block, counted from 1)")
        return _build_ssl(kind, options)
    raise ExtractorError(
        f"unknown extractor {options.extractor!r}; use mfcc, fbank, hf:PATH or fairseq:PATH"
    )


def _build_ssl(kind: str, options: ExtractorOptions) -> Extractor:
    from units.features import ssl

    try:
        if kind == "hf":
            model = ssl.load_hf(options.path, device=options.device)
        else:
            from units.features.fairseq_checkpoint import load_fairseq

            model = ssl.from_fairseq(load_fairseq(options.path, device=options.device))
        return ssl.SSLExtractor(
            model,
            options.layer,
            device=options.device,
            dtype=options.dtype,
            batch_seconds=options.batch_seconds,
            threads=options.threads,
        )
    except ExtractorError:
        raise
    except (ValueError, OSError) as e:  # The loaders' errors: missing files, layer range, ...
        raise ExtractorError(str(e)) from e
