"""Export a finished label set for lhotse, NeMo or Hugging Face datasets, one Ray task per shard.

FORMAT is one of:
  nemo    NeMo tarred-audio manifests over the shard tars (links, no audio copy):
          OUT/sharded_manifests/manifest_N.json, OUT/audio_N.tar; export.json has the
          manifest_filepath and tarred_audio_filepaths a NeMo config takes.
  hf      Hugging Face datasets Parquet, audio (the FLAC bytes as stored) and units in one
          table: OUT/data/train-*.parquet; load_dataset("parquet", data_dir=OUT,
          split="train") types audio as Audio(sampling_rate=16000). Needs unitpipe[hf].
  lhotse  a Lhotse Shar CutSet in OUT/shar (the FLAC bytes as stored, the units as a
          temporal array at the label rate): CutSet.from_shar(in_dir=OUT/shar).
          Needs unitpipe[lhotse].

Only labelled utterances are exported (label-pass rejects are left out, and counted). OUT
defaults to ROOT/labels/NAME/FORMAT. Each audio shard's files are written under temporary
names and renamed when complete; a rerun redoes only the shards whose files are missing,
and after a finished export it does nothing and says so. OUT/export.json is written last.

Example:
    unitpipe export nemo --root /data/ls100 --labels it1
    unitpipe export hf --root /data/ls100 --labels it1 --out /data/exports/it1-hf
    python -m pipelines.export lhotse --root /data/ll --labels it2 --address auto

The run's JSON record goes to ROOT/runs/export-FORMAT-NAME.json (--record); stdout gets a
summary and the lines that load the export.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import time

from . import _args, _cli
from ._schema import REQUIRED, Int, Option, Optional, Str, add_options

log = logging.getLogger(__name__)

#: Each format, and the package its extra installs (``pip install 'unitpipe[FORMAT]'``).
FORMATS = {"lhotse": "lhotse", "nemo": None, "hf": "datasets"}

OPTIONS = {
    "labels": Option(Str(), REQUIRED, "finished label set (ROOT/labels/NAME)", "NAME"),
    "out": Option(
        Optional(Str()), None, "output directory (default: ROOT/labels/NAME/FORMAT)", "DIR"
    ),
    "workers": Option(
        Optional(Int(lo=1)), None, "shards exported at once (default: one per CPU)", "N"
    ),
}

RECORD = "ROOT/runs/export-FORMAT-NAME.json"


def add_arguments(parser) -> None:
    parser.add_argument("format", choices=tuple(FORMATS), metavar="FORMAT", help=", ".join(FORMATS))
    _args.add_root(parser)
    add_options(parser, OPTIONS)
    _args.add_ray(parser)


def check(args) -> None:
    package = FORMATS[args.format]
    if package is not None and importlib.util.find_spec(package) is None:
        raise _cli.UsageError(
            f"the {args.format} export needs the {package} package: "
            f"pip install 'unitpipe[{args.format}]'"
        )


def exporter(args):
    """The format's module (``units.exports.FORMAT``), imported only when it is used."""
    name = f"units.exports.{args.format}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise _cli.UsageError(f"this unitpipe has no {args.format} export ({name})") from None


def out_dir(args) -> str:
    from shards.core import storage
    from shards.root import RootLayout

    root = RootLayout(args.root).root
    if args.out is not None:
        return args.out if storage.is_url(args.out) else storage.local_path(args.out)
    return storage.join(root, f"labels/{args.labels}/{args.format}")


def prepare(args) -> None:
    """The label set is finished and the output can be written: before Ray starts."""
    from shards.core.outputs import StageError
    from units.exports.common import finished_meta

    module = exporter(args)
    try:
        finished_meta(args.root, args.labels)
        if hasattr(module, "check"):  # An exporter's own needs (NeMo: local paths).
            module.check(args.root, args.labels, out_dir(args))
    except StageError as e:
        raise _cli.UsageError(str(e)) from None
    if args.out is None:
        _cli.check_writable(args.root)
    else:
        _cli.check_writable(out_dir(args), create=True)


def run(args) -> dict:
    import ray

    from shards.core.outputs import StageError
    from units.exports.common import finished_meta

    from ._ray import connect

    started = time.monotonic()
    module = exporter(args)
    out = out_dir(args)
    shards = finished_meta(args.root, args.labels)["shards"]
    connect(args)
    export_shard = ray.remote(num_cpus=1)(module.export_shard)
    limit = args.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    results: dict[str, dict] = {}
    pending: list = []

    def collect(refs: list) -> None:
        try:
            for result in ray.get(refs):
                results[result["shard"]] = result
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, StageError):
                raise _cli.UsageError(str(e.cause)) from None
            raise

    # At most `limit` tasks in flight; each returns a few counts, kept by shard.
    for shard in shards:
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            collect(done)
        pending.append(export_shard.remote(args.root, args.labels, shard, out))
    collect(pending)
    ordered = [results[shard] for shard in shards]
    try:
        record = module.finish(args.root, args.labels, out, ordered)
    except StageError as e:
        raise _cli.UsageError(str(e)) from None
    written = sum(not r["skipped"] for r in ordered)
    return {
        "format": args.format,
        "labels": args.labels,
        "out": out,
        "shards": len(ordered),
        "shards_written": written,
        "shards_skipped": len(ordered) - written,
        "utterances": sum(exported(r) for r in ordered),
        "unlabelled": sum(r["unlabelled"] for r in ordered),
        "export": record,
        "wall_seconds": time.monotonic() - started,
    }


def exported(result: dict) -> int:
    """Utterances a shard's result says it exported: ``utterances`` (NeMo, hf), or ``cuts``
    (lhotse, one cut per utterance)."""
    return result["utterances"] if "utterances" in result else result["cuts"]


def summarize(args, result: dict) -> str:
    what = (
        f"{result['utterances']} utterances in {result['shards']} shards "
        f"({result['unlabelled']} label-pass rejects left out) in {result['out']}"
    )
    if _cli.did_work(result):
        line = f"export {args.format}: wrote {result['shards_written']} shard(s); {what}"
    else:
        line = f"export {args.format}: nothing to do: the export is complete; {what}"
    return "\n".join([line, *(f"  {use}" for use in usage(result))])


def usage(result: dict) -> list[str]:
    """The lines that load the export, from its ``export.json``."""
    record = result["export"]
    if result["format"] == "nemo":
        return [
            f"manifest_filepath: {record['manifest_filepath']}",
            f"tarred_audio_filepaths: {record['tarred_audio_filepaths']}",
            "(with is_tarred: true, use_lhotse: true, skip_missing_manifest_entries: true)",
        ]
    if "load" in record:  # hf's export.json says it.
        return [record["load"]]
    return [f'lhotse.CutSet.from_shar(in_dir="{os.path.join(result["out"], "shar")}")']


def record_path(args) -> str:
    return _cli.record_path(args.root, f"export-{args.format}", args.labels)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
