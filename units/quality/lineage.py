"""What a report is made from, and whether a report already written was made from the same.

:func:`of_labels` gathers a label set's lineage from what the earlier stages recorded, and
nothing else: the label set's ``meta.json`` (extractor spec, checkpoint and its sha256,
layer, target, label rate, manifest sha256, hours), the k-means's ``kmeans.json`` (its
config, seed, PCA, iterations, fingerprint) or the BEST-RQ quantizer's ``quantizer.json``,
the corpus's ``manifest/summary.json``, and the versions of unitpipe and of the libraries
the report runs with. The report's ``metrics.json`` keeps it under ``lineage``.

:func:`choose_phones` decides which reference phones a report is built with when a rerun
gives none, from the ``metrics.json`` a report directory already holds (see its docstring):
a rerun never replaces a PNMI report with a usage-only one for the same labels.

Example:
    >>> meta = {"k": 100, "kmeans": "km100", "frame_rate": 100.0}
    >>> len(labels_fingerprint(meta))
    64
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import metadata

from shards.core import storage
from shards.core.atomic import read_json
from shards.root import RootLayout
from units.quality import phone_refs

#: ``kmeans.json`` keys copied into the lineage: how the centroids were fitted.
KMEANS_KEYS = (
    "fingerprint",
    "k",
    "seed",
    "config",
    "pca",
    "features",
    "features_fingerprint",
    "rows",
    "iterations",
    "converged",
    "empty_clusters",
    "inertia_per_frame",
)
#: ``quantizer.json`` keys copied into the lineage: how a BEST-RQ quantizer was drawn.
QUANTIZER_KEYS = ("fingerprint", "config", "frame_rate", "window", "hop")
#: ``manifest/summary.json`` keys copied into the lineage: the corpus the labels cover.
CORPUS_KEYS = ("hours", "segments", "files", "speakers", "shards", "layout", "rejects")
#: Libraries whose versions the report records (import name: distributions that provide it;
#: faiss comes as one of several builds).
LIBRARIES = {
    "numpy": ("numpy",),
    "pyarrow": ("pyarrow",),
    "torch": ("torch",),
    "faiss": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss"),
    "ray": ("ray",),
    "soundfile": ("soundfile",),
    "librosa": ("librosa",),
    "matplotlib": ("matplotlib",),
    "praatio": ("praatio",),
    "transformers": ("transformers",),
}


def labels_fingerprint(meta: dict) -> str:
    """sha256 of a label set's ``meta.json`` content (keys sorted): its lineage and totals.

    The label pass writes ``meta.json`` again only when it labelled something, so the
    fingerprint changes with a new k-means or quantizer, new features, a new manifest or new
    label shards, and stays the same on a rerun that found every shard done.
    """
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def target_type(meta: dict) -> str:
    """What labelled: ``kmeans`` or ``bestrq`` (a label set names it in ``target``, a
    k-means's by default, as the exports read it)."""
    return meta.get("target", "kmeans")


def of_labels(root: str, labels: str, meta: dict) -> dict:
    """The lineage of label set ``labels`` (its ``meta.json`` given), as recorded upstream.

    Returns:
        ``labels``, ``labels_fingerprint`` (:func:`labels_fingerprint`), ``target``
        (:func:`target_type`), ``frame_rate``, ``extractor`` (the feature spec as
        ``meta.json`` records it: extractor, dim, window, hop, checkpoint and its sha256,
        layer, ...), ``features`` (the feature store), ``manifest_sha256``, ``hours`` and
        ``utterances`` labelled; ``kmeans`` (name and :data:`KMEANS_KEYS` of
        ``kmeans.json``) or ``bestrq`` (name, ``codebooks``, ``stack`` and
        :data:`QUANTIZER_KEYS` of ``quantizer.json``); ``corpus`` (:data:`CORPUS_KEYS` of
        ``manifest/summary.json``); ``versions`` (unitpipe's when the labels, the k-means
        and this report were made) and ``libraries`` (those this report runs with). A key
        whose source does not record it is left out.
    """
    from units import project_version

    out = {
        "labels": labels,
        "labels_fingerprint": labels_fingerprint(meta),
        "target": target_type(meta),
        "frame_rate": meta.get("frame_rate"),
        "extractor": meta.get("spec"),
        "features": meta.get("features"),
        "manifest_sha256": meta.get("manifest_sha256"),
        "hours": meta.get("hours"),
        "utterances": meta.get("utterances"),
    }
    versions = {"labels": meta.get("version")}
    if meta.get("kmeans") is not None:
        saved = read_json(storage.join(root, f"kmeans/{meta['kmeans']}/kmeans.json")) or {}
        out["kmeans"] = dict(name=meta["kmeans"], **_picked(saved, KMEANS_KEYS))
        versions["kmeans"] = saved.get("version")
    if target_type(meta) == "bestrq" and meta.get("bestrq") is not None:
        saved = read_json(storage.join(root, f"bestrq/{meta['bestrq']}/quantizer.json")) or {}
        recorded = _picked(meta, ("codebooks", "stack"))
        out["bestrq"] = dict(name=meta["bestrq"], **recorded, **_picked(saved, QUANTIZER_KEYS))
    summary = read_json(RootLayout(root).manifest("summary.json"))
    if summary:
        out["corpus"] = _picked(summary, CORPUS_KEYS)
    versions["report"] = project_version()
    out["versions"] = {stage: v for stage, v in versions.items() if v is not None}
    out["libraries"] = library_versions()
    return {key: value for key, value in out.items() if value is not None}


def _picked(record: dict, keys: tuple[str, ...]) -> dict:
    return {key: record[key] for key in keys if record.get(key) is not None}


def library_versions() -> dict[str, str]:
    """The installed version of each of :data:`LIBRARIES` (those installed), read from the
    package metadata without importing them."""
    out = {}
    for name, distributions in LIBRARIES.items():
        for distribution in distributions:
            try:
                out[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def rows(made_from: dict) -> list[tuple[str, str]]:
    """The lineage as the page shows it: ``(what, value)`` rows, in the order the stages
    ran, of what :func:`of_labels` found."""
    target = made_from["target"]
    out = [("label set", made_from["labels"]), ("labels from", _TARGETS.get(target, target))]
    out.append(("labels fingerprint (sha256 of meta.json)", made_from["labels_fingerprint"]))
    if "frame_rate" in made_from:
        out.append(("label rate (Hz)", f"{made_from['frame_rate']:g}"))
    spec = made_from.get("extractor") or {}
    if spec:
        shape = ", ".join(
            f"{key} {spec[key]}" for key in ("dim", "window", "hop") if spec.get(key) is not None
        )
        out.append(("extractor", f"{spec.get('extractor')} ({shape})"))
        for key, title in _SPEC_ROWS:
            if spec.get(key) is not None:
                out.append((title, str(spec[key])))
    if "features" in made_from:
        out.append(("feature store", made_from["features"]))
    for name in ("kmeans", "bestrq"):
        fitted = made_from.get(name)
        if fitted:
            title = _TARGETS[name]
            out.append((title, fitted["name"]))
            out += [
                (f"{title} {_FITTED_TITLES.get(key, key.replace('_', ' '))}", _text(value))
                for key, value in fitted.items()
                if key != "name"
            ]
    for key, title in _LABELLED_ROWS:
        if key in made_from:
            out.append((title, _text(made_from[key])))
    corpus = made_from.get("corpus") or {}
    if corpus:
        out.append(("corpus (manifest summary)", _text(corpus)))
    out.append(("unitpipe versions", _text(made_from.get("versions", {}))))
    out.append(("libraries (this report)", _text(made_from.get("libraries", {}))))
    return out


_SPEC_ROWS = (
    ("architecture", "model architecture"),
    ("checkpoint", "checkpoint"),
    ("checkpoint_sha256", "checkpoint sha256"),
    ("layer", "layer"),
    ("normalize_waveform", "waveform normalised"),
)
_LABELLED_ROWS = (
    ("manifest_sha256", "manifest sha256"),
    ("utterances", "utterances labelled"),
    ("hours", "hours labelled"),
)
_TARGETS = {"kmeans": "k-means", "bestrq": "BEST-RQ quantizer"}
_FITTED_TITLES = {
    "pca": "PCA",
    "features": "feature store",
    "features_fingerprint": "feature store fingerprint",
    "rows": "frames fitted",
    "inertia_per_frame": "final inertia per frame",
    "frame_rate": "rate (Hz)",
    "window": "window (samples)",
    "hop": "hop (samples)",
    "stack": "frames stacked",
}


def _text(value) -> str:
    """A value on one line: ``key value`` pairs for a dict, 4 significant digits for a float."""
    if isinstance(value, dict):  # Keys without a value recorded are left out.
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items() if v is not None) or "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ------------------------------------------------------------------ the reference phones
@dataclasses.dataclass(frozen=True)
class PhonesChoice:
    """Which reference phones to build a report with, and whether to build it at all.

    Attributes:
        phones: The reference phones to build with (None: unit usage only).
        keep: True when the report already in the directory must stay as it is: it holds
            the same labels' PNMI, made with phones that are gone or changed.
        note: What was decided and why, for the log and the summary (None when the phones
            were given, or when there was nothing to decide).
    """

    phones: str | None
    keep: bool = False
    note: str | None = None


def previous_metrics(directory: str) -> dict | None:
    """The ``metrics.json`` of the report in ``directory``, or None (no report, or one that
    cannot be read)."""
    try:
        saved = read_json(storage.join(directory, "metrics.json"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def choose_phones(
    directory: str, phones: str | None, labels: str, fingerprint: str, meta: dict
) -> PhonesChoice:
    """The reference phones for the report of label set ``labels`` in ``directory``.

    Given phones are used. Without, the report already in ``directory`` decides:

    - none, or one without phones: unit usage only;
    - one made with phones that are still there with the same content (the sha256 its
      ``metrics.json`` records): those phones again, so the rerun keeps PNMI;
    - one made with phones that are gone or changed since, for the same labels (name and
      :func:`labels_fingerprint`): ``keep``, the report stays as it is (it already holds
      these labels' usage numbers, and more); give phones to rebuild it;
    - the same, for labels that changed since: unit usage only (its PNMI was for other labels).

    Args:
        directory: The report's directory.
        phones: The reference phones given, or None.
        labels: The label set's name.
        fingerprint: Its :func:`labels_fingerprint`.
        meta: Its ``meta.json`` (for a report written before fingerprints were recorded).
    """
    if phones is not None:
        return PhonesChoice(phones)
    before = previous_metrics(directory)
    if not before or not isinstance(before.get("phones"), dict):
        return PhonesChoice(None)
    used = before["phones"].get("references")
    recorded = before["phones"].get("references_sha256")
    report = storage.join(directory, "report.html")
    found = _sha256(used)
    if found is not None and recorded in (found, None):  # None: a report from before sha256s.
        return PhonesChoice(
            used, note=f"no phones given: reusing {used}, the reference phones of {report}"
        )
    state = "gone" if found is None else "changed since (another sha256)"
    if _same_labels(before, labels, fingerprint, meta):
        return PhonesChoice(
            None,
            keep=True,
            note=f"no phones given and {used}, the reference phones of {report}, are {state}: "
            "kept that report as it is (the same labels, with PNMI); give reference phones "
            "(--phones; report.phones in a hubert config) to rebuild it",
        )
    return PhonesChoice(
        None,
        note=f"no phones given and {used}, the reference phones of {report}, are {state}; the "
        "labels changed since: unit usage only",
    )


def _sha256(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return phone_refs.fingerprint(path)
    except OSError:
        return None


def _same_labels(before: dict, labels: str, fingerprint: str, meta: dict) -> bool:
    """Whether an earlier report's numbers are of these labels: the same name and
    fingerprint; for a report that recorded no fingerprint, the same name, k and frames."""
    if before.get("labels") != labels:
        return False
    recorded = (before.get("lineage") or {}).get("labels_fingerprint")
    if recorded is not None:
        return recorded == fingerprint
    frames = (before.get("usage") or {}).get("frames")
    if frames is None or before.get("k") != meta.get("k"):
        return False
    return frames == meta.get("frames")
