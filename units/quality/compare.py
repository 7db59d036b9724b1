"""Label sets side by side on the same reference phones: one page to choose k, layer or target.

:func:`compare` builds each label set's report (:func:`units.quality.report.build`, the
same numbers as its own page) and takes one row of it per set; :func:`write_comparison`
renders ``ROOT/reports/compare-A+B+C/``::

    comparison.html   a table, one row per label set, the best value of each column marked,
                      and PNMI (or perplexity, without references) against the
                      deduplicated units per second, every figure embedded
    comparison.json   the rows

The columns are comparable across targets and rates: units per second of audio (the label
rate, less the frames a front end loses at the edges) and deduplicated units per second
(runs of one unit per second: the length a unit language model sees) put a 100 Hz MFCC
k-means, a 50 Hz HuBERT layer and a 25 Hz BEST-RQ codebook on one scale. PNMI and the
purities are measured on the reference phones' 100 Hz frames, each label repeated to cover
its frames (4 per label at 25 Hz).

Example:
    >>> comparison = compare("/data/ls100", ["km100", "hubert-l6-500", "bestrq"],
    ...                      "/data/dev-phones.tsv")  # doctest: +SKIP
    >>> paths = write_comparison(comparison, "/data/ls100/reports/compare")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os

from shards.core import storage
from shards.core.atomic import write_atomic
from units.quality import report


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of the table: its key in a row, its heading, its format, and which way is
    better (``"high"``, ``"low"``, or None where no value is better than another)."""

    key: str
    title: str
    format: str
    better: str | None = None


#: The table's columns, in order. PNMI and the purities only with reference phones.
COLUMNS = (
    Column("target", "labels from", "{}"),
    Column("frame_rate", "label rate (Hz)", "{:g}"),
    Column("k", "units (k)", "{:d}"),
    Column("used", "units used", "{:d}"),
    Column("perplexity", "perplexity", "{:.1f}", "high"),
    Column("units_per_second", "units per second", "{:.1f}", "low"),
    Column("dedup_units_per_second", "deduplicated units per second", "{:.1f}", "low"),
    Column("pnmi", "PNMI", "{:.3f}", "high"),
    Column("phone_purity", "phone purity", "{:.3f}", "high"),
    Column("cluster_purity", "cluster purity", "{:.3f}", "high"),
)

_PHONE_KEYS = ("pnmi", "phone_purity", "cluster_purity")


@dataclasses.dataclass
class Comparison:
    """Label sets side by side.

    Attributes:
        labels: The label sets' names, in the order given.
        phones: The reference phones, or None (usage only).
        rows: One dict per label set: ``labels`` and every :data:`COLUMNS` key it has, plus
            ``seconds`` (audio labelled), ``frames`` and, with references, the ``frames``
            and ``utterances`` compared (``phone_frames``, ``phone_utterances``).
        reports: Each set's own report, to write as its own page.
    """

    labels: list[str]
    phones: str | None
    rows: list[dict]
    reports: dict[str, report.Report]

    def columns(self) -> list[Column]:
        """The columns the rows have (PNMI and purities only with references)."""
        return [c for c in COLUMNS if all(c.key in row for row in self.rows)]

    def best(self) -> dict[str, set[int]]:
        """Per column with a better direction: the rows holding its best value (every row
        that ties); nothing with fewer than two rows."""
        if len(self.rows) < 2:
            return {}
        out = {}
        for column in self.columns():
            if column.better is None:
                continue
            values = [row[column.key] for row in self.rows]
            best = max(values) if column.better == "high" else min(values)
            out[column.key] = {i for i, v in enumerate(values) if v == best}
        return out


def compare(root: str, labels: list[str], phones: str | None = None) -> Comparison:
    """Builds each label set's report and one row per set.

    Args:
        root: The dataset root (a local path or a URL).
        labels: Label set names (``ROOT/labels/NAME``), distinct.
        phones: Reference phones (see :func:`units.quality.phone_refs.read_references`),
            or None for usage only.

    Raises:
        ValueError: No label set, or one named twice.
        As :func:`units.quality.report.build`, for any of the sets.
    """
    labels = list(labels)
    if not labels:
        raise ValueError("name at least one label set to compare")
    twice = sorted({name for name in labels if labels.count(name) > 1})
    if twice:
        raise ValueError(f"label sets named more than once: {', '.join(twice)}")
    reports = {name: report.build(root, name, phones) for name in labels}
    rows = [row(reports[name].metrics) for name in labels]
    return Comparison(labels=labels, phones=phones, rows=rows, reports=reports)


def row(numbers: dict) -> dict:
    """One label set's row, from its report's numbers (``metrics.json``)."""
    usage = numbers["usage"]
    out = {
        "labels": numbers["labels"],
        "target": report.target(numbers),
        "frame_rate": float(numbers["frame_rate"]),
        "k": int(numbers["k"]),
        "used": usage["used"],
        "perplexity": usage["perplexity"],
        "units_per_second": numbers["units_per_second"],
        "dedup_units_per_second": numbers["dedup_units_per_second"],
        "seconds": numbers["seconds"],
        "frames": usage["frames"],
    }
    if "phones" in numbers:
        p = numbers["phones"]
        out.update({key: p[key] for key in _PHONE_KEYS})
        out["phone_frames"], out["phone_utterances"] = p["frames"], p["utterances"]
    return out


def headline(comparison: Comparison) -> list[str]:
    """One line per label set: what labelled, then the table's numbers."""
    lines = []
    for r in comparison.rows:
        numbers = [f"{r['frame_rate']:g} Hz"]
        if "pnmi" in r:
            numbers += [
                f"PNMI {r['pnmi']:.3f}",
                f"phone purity {r['phone_purity']:.3f}",
                f"cluster purity {r['cluster_purity']:.3f}",
            ]
        numbers += [
            f"perplexity {r['perplexity']:.1f} ({r['used']} of {r['k']} used)",
            f"{r['units_per_second']:.1f} units/s",
            f"{r['dedup_units_per_second']:.1f} deduplicated/s",
        ]
        lines.append(f"{r['labels']} ({r['target']}): {', '.join(numbers)}")
    return lines


# --------------------------------------------------------------------------- figure
def figure(comparison: Comparison) -> bytes:
    """PNG bytes: each label set a point, deduplicated units per second against PNMI (with
    references) or perplexity (without), named beside it."""
    import matplotlib

    matplotlib.use("Agg")  # Headless: workers and CI have no display.
    import matplotlib.pyplot as plt

    quality = _quality(comparison)
    x = [r["dedup_units_per_second"] for r in comparison.rows]
    y = [r[quality] for r in comparison.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x, y, s=40, color="#4c72b0", zorder=3)
    for r, xi, yi in zip(comparison.rows, x, y, strict=True):
        ax.annotate(r["labels"], (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(0.2)
    ax.grid(alpha=0.3)
    ax.set_xlabel("deduplicated units per second of audio")
    ax.set_ylabel("PNMI" if quality == "pnmi" else "perplexity")
    better = "up and left" if quality == "pnmi" else "up: more of the codebook in use"
    ax.set_title(f"{len(comparison.rows)} label sets ({better} is better)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _quality(comparison: Comparison) -> str:
    return "pnmi" if all("pnmi" in r for r in comparison.rows) else "perplexity"


# ------------------------------------------------------------------------------ page
def render_html(comparison: Comparison, png: bytes, links: dict[str, str] | None = None) -> str:
    """One page: the table (best value per column in bold, marked ★), then the figure.

    ``links``: the address of each set's own report relative to the page, where known.
    """
    columns = comparison.columns()
    best = comparison.best()
    links = links or {}
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in columns)
    body = []
    for i, r in enumerate(comparison.rows):
        name = html.escape(r["labels"])
        if r["labels"] in links:
            name = f'<a href="{html.escape(links[r["labels"]])}">{name}</a>'
        cells = [f"<th>{name}</th>"]
        for c in columns:
            text = html.escape(c.format.format(r[c.key]))
            if i in best.get(c.key, ()):
                cells.append(f'<td class=best title="best">★ <b>{text}</b></td>')
            else:
                cells.append(f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    ranked = ", ".join(
        f"{c.title}: {'higher' if c.better == 'high' else 'lower'}"
        for c in columns
        if c.better is not None
    )
    if comparison.phones:
        refs = f"on the reference phones {html.escape(comparison.phones)} (100 Hz frames)"
    else:
        refs = "without reference phones: unit usage only"
    title = html.escape(f"unitpipe comparison: {' · '.join(comparison.labels)}")
    image = base64.b64encode(png).decode()
    quality = "PNMI" if _quality(comparison) == "pnmi" else "perplexity"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{padding:3px 10px;border-bottom:1px solid #ddd;
text-align:right}}th:first-child,td:nth-child(2){{text-align:left}}
.best{{background:#e8f3e8}}figure{{margin:2em 0}}img{{max-width:100%}}</style>
</head><body><h1>{title}</h1>
<p>{len(comparison.rows)} label sets {refs}. ★ marks the best value of a column ({ranked}).
Units per second count label frames per second of audio; deduplicated, runs of one unit
(the sequence length a unit language model sees). A set with several codebooks is measured
on its first.</p>
<table><tr><th>label set</th>{head}</tr>
{chr(10).join(body)}
</table>
<figure><img alt="comparison" src="data:image/png;base64,{image}"><figcaption>Each label set
a point: deduplicated units per second against {quality}.</figcaption></figure>
</body></html>
"""


def write_comparison(
    comparison: Comparison, directory: str, reports: dict[str, str] | None = None
) -> dict[str, str]:
    """Writes ``comparison.json``, ``comparison.png`` and ``comparison.html`` (last: the
    page is the comparison's commit) under ``directory``; returns their paths.

    ``reports``: where each set's own ``report.html`` is, for the table to link to it (local
    paths, or URLs on the same store as ``directory``).
    """
    storage.makedirs(directory)
    png = figure(comparison)
    paths = {"figure": os.path.join(directory, "comparison.png")}
    write_atomic(paths["figure"], png, sync_dir=False)
    paths["json"] = os.path.join(directory, "comparison.json")
    record = {"labels": comparison.labels, "phones": comparison.phones, "rows": comparison.rows}
    write_atomic(paths["json"], json.dumps(record, indent=1, sort_keys=True).encode())
    paths["comparison"] = os.path.join(directory, "comparison.html")
    links = {name: _relative(path, directory) for name, path in (reports or {}).items()}
    page = render_html(comparison, png, {n: link for n, link in links.items() if link})
    write_atomic(paths["comparison"], page.encode())
    return paths


def _relative(path: str, directory: str) -> str | None:
    """``path`` relative to ``directory`` (both local, or URLs with the same scheme and
    bucket); None when there is no relative address."""
    if storage.is_url(path) != storage.is_url(directory):
        return None
    if storage.is_url(path):
        scheme, rest = path.split("://", 1)
        other_scheme, other = directory.split("://", 1)
        if scheme != other_scheme or rest.split("/", 1)[0] != other.split("/", 1)[0]:
            return None
        path, directory = "/" + rest, "/" + other
    return os.path.relpath(os.path.abspath(path), os.path.abspath(directory))
