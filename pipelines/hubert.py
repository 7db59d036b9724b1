"""One HuBERT iteration end to end: shard -> features (a sample) -> k-means -> labels -> report.

Everything comes from one YAML file; any key can be overridden on the command line as
``section.key=value`` (the value is read as YAML). Every key is checked (its type, its
range, the splits) before Ray starts; --print-config shows the resolved config and stops.
Completed stages are skipped: each stage resumes from its own commits, so rerunning the
same command after a crash or a kill picks up where it stopped, and a finished run does
nothing. Each stage's record goes to ROOT/runs/STAGE-NAME.json, and the run's (the config
and every stage's record) to ROOT/runs/hubert-LABELNAME.json (--record).

The next iteration is the same file with the features taken from a checkpoint's layer:
``features.extractor=hf:/ckpt/hubert-it1 features.layer=6`` (and new names).

Example:
    python -m pipelines.hubert --config configs/hubert-mfcc.yaml root=/data/ls100 \\
        inputs=[/data/LibriSpeech/train-clean-100]
    python -m pipelines.hubert --config configs/hubert-mfcc.yaml root=/data/ls100 \\
        features.name=h6 features.extractor=fairseq:/ckpt/it1.pt features.layer=6 \\
        kmeans.name=h6k500 kmeans.k=500 label.name=it2
    unitpipe hubert --config configs/hubert-mfcc.yaml root=/data/ls100 --print-config
    ray job submit --working-dir . -- python -m pipelines.hubert --config configs/hubert-mfcc.yaml

Config keys (defaults in brackets; each is the stage's flag of the same name):
    root                    dataset root, a local path or s3://bucket/prefix (required)
    inputs                  corpora to shard ([]: ROOT is already sharded)
    shard.layout [auto]     shard.segment [none]      shard.target_seconds [30]
    shard.vad [webrtc]      shard.shard_bytes [1GiB]  shard.max_samples [10000]
    shard.seed              shard.verify [false]      shard.extensions [flac,wav,...]
    features.name [mfcc]    features.extractor [mfcc]  features.layer
    features.percent [10]   features.hours (wins over percent)  features.seed [0]
    features.gpus_per_worker [0]  features.dtype (bf16, fp16)  features.threads
    features.batch_seconds [BATCH_SECONDS]  features.bucket_seconds (1 batch on CPU, 8 on GPU)
    kmeans.name [mfcc100]   kmeans.k [100]  kmeans.pca  kmeans.whiten [false]
    kmeans.init [k-means||] kmeans.algorithm [lloyd]  kmeans.max_iter [100]
    kmeans.tol [1e-4]       kmeans.seed [0]  kmeans.batch_size [10000]
    kmeans.rows [auto]      kmeans.stream [false]  kmeans.workers  kmeans.gpus_per_worker [0]
    kmeans.fairseq_export [false]
    label.name [it1]        label.workers    label.gpus_per_worker (one per actor with GPUs)
    label.extractor         label.layer      label.dedup [false]
    label.fairseq_splits [{train: 99, valid: 1}]  label.split_by [utterance]
    label.split_seed [0]    label.fairseq_audio [shards]
    report.phones           reference phones for PNMI (tsv, ctm, TextGrid directory; a rerun
                            without them reuses the report's own while their sha256 holds)
    report.out              [ROOT/reports/LABELNAME]
    ray.address             a running cluster (also RAY_ADDRESS) [in-process local Ray]
    ray.num_cpus            CPUs of in-process local Ray
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

from . import _args, _cli, features, kmeans, label, report, shard
from ._schema import Option, Optional, Str, StrList, check_section

if __doc__:  # The default lives in ExtractorOptions alone; the key list above shows it.
    __doc__ = __doc__.replace("[BATCH_SECONDS]", f"[{features.OPTIONS['batch_seconds'].default:g}]")

#: Top-level keys, then one section per stage: the stage's own options. ``root`` is
#: required to run (:func:`load_config`), not to show the config.
TOP = {
    "root": Option(Optional(Str()), None, "dataset root"),
    "inputs": Option(StrList(), [], "corpora to shard"),
}
SECTIONS = {
    "shard": shard.OPTIONS,
    "features": features.OPTIONS,
    "kmeans": kmeans.OPTIONS,
    "label": label.OPTIONS,
    "report": report.OPTIONS,
    "ray": _args.RAY,
}
#: Where this pipeline's defaults differ from the stages' (whose flags are required).
HUBERT_DEFAULTS = {
    "features": {"name": "mfcc", "extractor": "mfcc", "percent": 10.0},
    "kmeans": {"name": "mfcc100", "k": 100},
    "label": {"name": "it1", "fairseq_splits": {"train": 99.0, "valid": 1.0}},
}


def _defaults() -> dict:
    out: dict = {"root": None, "inputs": []}
    for section, options in SECTIONS.items():
        given = HUBERT_DEFAULTS.get(section, {})
        out[section] = {
            key: copy.deepcopy(given.get(key, None if option.required else option.default))
            for key, option in options.items()
        }
    return out


#: Every key with its default.
DEFAULTS: dict = _defaults()


class ConfigError(_cli.UsageError):
    """A config file or override that cannot be used."""


def load_config(path: str | None, overrides: list[str], *, require: bool = True) -> dict:
    """The defaults, updated by the YAML file, then by ``a.b=value`` overrides; every key
    checked against its type and range (:mod:`pipelines._schema`).

    Args:
        require: Refuse a config without ``root`` (``False``: show it as null).

    Raises:
        ConfigError: An unreadable file, an unknown key, a malformed override, a value of
            the wrong type or out of range, or a missing required key.
    """
    import yaml

    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {_cli.one_line(e)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        _merge(raw, loaded, path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or _cli.one_line(e)
            raise ConfigError(f"override {item!r}: not YAML ({problem})") from None
        tree: dict = value
        for part in reversed(key.split(".")):
            tree = {part: tree}
        _merge(raw, tree, f"override {item!r}")
    if require and not raw.get("root"):
        raise ConfigError("root is required (in the config or as root=/path)")
    if raw.get("features", {}).get("extractor", "") is None:
        raise ConfigError(
            "features.extractor is required: mfcc, or the checkpoint of the last iteration "
            "as features.extractor=fairseq:/path/to/checkpoint.pt (or hf:/path)"
        )
    try:
        config = check_section({k: v for k, v in raw.items() if k in TOP}, TOP, "")
        for section, options in SECTIONS.items():
            config[section] = check_section(
                raw.get(section, {}), options, section, HUBERT_DEFAULTS.get(section)
            )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def _merge(into: dict, new: dict, where: str, section: str | None = None) -> None:
    """Merges ``new`` into the raw config ``into``; a key must be one the schema knows."""
    known = SECTIONS[section] if section else {**TOP, **SECTIONS}
    for key, value in new.items():
        name = f"{section}.{key}" if section else str(key)
        if key not in known:
            names = ", ".join(sorted(f"{section}.{k}" if section else k for k in known))
            raise ConfigError(f"{where}: unknown key {name!r}; known: {names}")
        if section is None and key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} is a section, got {value!r}")
            _merge(into.setdefault(key, {}), value, where, key)
        else:
            into[key] = value


def print_config(config: dict) -> str:
    """The resolved config as YAML: every key, in the schema's order."""
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="YAML config (see the keys above)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML, every key) and exit without running",
    )
    _args.add_progress(parser)
    _args.add_ray(parser)  # The same flags as every stage (ray.address=... also works).


RECORD = "ROOT/runs/hubert-LABELNAME.json"


def _stages(config: dict, progress: bool) -> dict[str, argparse.Namespace]:
    """Each stage's arguments, as its command line would give them."""
    root = config["root"]
    common = dict(progress=progress, record=None)
    f, k, lab = config["features"], config["kmeans"], config["label"]
    stages = {}
    if config["inputs"]:
        stages["shard"] = argparse.Namespace(
            input=config["inputs"], output=root, **config["shard"], **common
        )
    stages["features"] = argparse.Namespace(root=root, **f, **common)
    stages["kmeans"] = argparse.Namespace(root=root, features=f["name"], **k, **common)
    stages["label"] = argparse.Namespace(root=root, kmeans=k["name"], **lab, **common)
    stages["report"] = argparse.Namespace(
        root=root, labels=lab["name"], **config["report"], **common
    )
    return stages


_MODULES = {"shard": shard, "features": features, "kmeans": kmeans, "label": label,
            "report": report}  # fmt: skip


def check(args) -> int | None:
    """Resolves and checks the config and every stage's arguments, before Ray starts;
    with --print-config, prints it and ends (exit status 0)."""
    config = load_config(args.config, args.overrides, require=not args.print_config)
    for key in ("address", "num_cpus"):
        if getattr(args, key) is not None:
            config["ray"][key] = getattr(args, key)
    if args.print_config:
        print(print_config(config), end="")
        return 0
    args.config_resolved = config
    args.stages = _stages(config, args.progress)
    if "shard" not in args.stages:  # Checked all the same: every key of a config is.
        shard.check(argparse.Namespace(**config["shard"]))
    for name, stage in args.stages.items():
        try:
            _MODULES[name].check(stage)
        except _cli.UsageError as e:
            raise _cli.UsageError(f"{name}: {e}") from None
    return None


def prepare(args) -> None:
    """ROOT can be written, and holds shards or gets them from the inputs (which exist)."""
    from shards.core import storage

    config = args.config_resolved
    root = config["root"]
    if "shard" in args.stages:
        shard.prepare(args.stages["shard"])  # The inputs exist; ROOT can be written.
    else:
        _cli.check_writable(root)
        if not storage.exists(os.path.join(root, "manifest", "utterances.parquet")):
            raise ConfigError(f"{root} holds no shards and the config gives no inputs to shard")


def run(args) -> dict:
    """Runs every stage in order; returns each stage's result, and the config."""
    from shards.core import storage

    from ._ray import connect

    config, stages = args.config_resolved, args.stages
    root, out, started = config["root"], {"config": config}, time.monotonic()
    connect(argparse.Namespace(**config["ray"]))
    for name in ("shard", "features", "kmeans"):
        if name in stages:
            out[name] = _stage(name, stages[name], _MODULES[name].run)
    lab = stages["label"]
    out["label"] = _stage("label", lab, label.label_pass)
    if lab.fairseq_splits and storage.is_url(root):
        from units.labels.fairseq import REMOTE_ROOT_HINT

        hint = REMOTE_ROOT_HINT.format(root=root)
        print(f"== fairseq: skipped, fairseq reads local files: {hint}", flush=True)
    elif lab.fairseq_splits:
        began = time.monotonic()
        print("== fairseq", flush=True)
        out["fairseq"] = label.export(lab)
        print(label.describe_export(lab, out["fairseq"]))
        print(f"== fairseq: done in {_cli.timed(began)}", flush=True)
    out["report"] = _stage("report", stages["report"], report.run)
    out["shards_redone"] = redone(out)
    out["wall_seconds"] = time.monotonic() - started
    return out


#: The stages whose unit of work is a shard, and which count the shards they wrote again.
SHARD_STAGES = ("shard", "features", "label")


def redone(result: dict) -> int:
    """Shards written again in this run because the worker or node writing them was lost
    (each stage's ``shards_redone``): the work a lost node cost. Committed shards are never
    written again, so a rerun after a crash does not count here."""
    return sum(result[name].get("shards_redone", 0) for name in SHARD_STAGES if name in result)


def _stage(name: str, args: argparse.Namespace, call) -> dict:
    """Runs one stage: a header, its summary (its record written), how long it took."""
    began = time.monotonic()
    print(f"== {name}", flush=True)
    result = call(args)
    print(_cli.record_and_summarize(_MODULES[name], args, result), flush=True)
    state = "done" if _cli.did_work(result) else "already complete"
    print(f"== {name}: {state} in {_cli.timed(began)}", flush=True)
    return result


def summarize(args, result: dict) -> str:
    stages = [n for n in ("shard", "features", "kmeans", "label", "fairseq") if n in result]
    complete = [n for n in stages if n != "fairseq" and not _cli.did_work(result[n])]
    ran = [n for n in stages if n not in complete] + ["report"]
    return (
        f"hubert: iteration {result['config']['label']['name']} in "
        f"{result['wall_seconds']:.1f} s: ran {', '.join(ran)}"
        + (f"; already complete: {', '.join(complete)}" if complete else "")
        + (
            f"; {result['shards_redone']} shard(s) written again after lost workers"
            if result.get("shards_redone")
            else ""
        )
        + f"; report {result['report']['paths']['report']}"
    )


def record_path(args) -> str:
    config = args.config_resolved
    return _cli.record_path(config["root"], "hubert", config["label"]["name"])


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
