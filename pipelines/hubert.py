"""One HuBERT iteration end to end: shard -> features (a sample) -> k-means -> labels -> report.

Everything comes from one YAML file; any key can be overridden on the command line as
``section.key=value`` (the value is read as YAML). Completed stages are skipped: each stage
resumes from its own commits, so rerunning the same command after a crash or a kill picks
up where it stopped, and a finished run does nothing.

The next iteration is the same file with the features taken from a checkpoint's layer:
``features.extractor=hf:/ckpt/hubert-it1 features.layer=6`` (and new names).

Example:
    python -m pipelines.hubert --config configs/hubert-mfcc.yaml root=/data/ls100 \\
        inputs=[/data/LibriSpeech/train-clean-100]
    python -m pipelines.hubert --config configs/hubert-mfcc.yaml root=/data/ls100 \\
        features.name=h6 features.extractor=fairseq:/ckpt/it1.pt features.layer=6 \\
        kmeans.name=h6k500 kmeans.k=500 label.name=it2
    ray job submit --working-dir . -- python -m pipelines.hubert --config configs/hubert-mfcc.yaml

Config keys (defaults in brackets):
    root                    dataset root (required)
    inputs                  corpora to shard ([]: ROOT is already sharded)
    shard.*                 ShardingOptions: layout, segment, shard_bytes ("1GiB"),
                            max_samples, seed, verify, vad, target_seconds
    features.name [mfcc]    features.extractor [mfcc]  features.layer  features.percent [10]
    features.hours          features.seed [0]          features.gpus_per_worker [0]
    kmeans.name [mfcc100]   kmeans.k [100]  kmeans.seed [0]  kmeans.max_iter [100]
    kmeans.tol [1e-4]       kmeans.init [k-means||]    kmeans.algorithm [lloyd]
    kmeans.pca              kmeans.whiten [false]      kmeans.workers  kmeans.gpus_per_worker [0]
    label.name [it1]        label.fairseq_splits [{train: 99, valid: 1}]
    label.split_by [utterance]  label.split_seed [0]   label.dedup [false]
    label.workers           label.gpus_per_worker (one per actor when the cluster has GPUs)
    report.phones           reference phones for PNMI (tsv, ctm, TextGrid directory)
    ray.address             a running cluster (also RAY_ADDRESS) [in-process local Ray]
    ray.num_cpus            CPUs of in-process local Ray
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import yaml

from . import _cli
from ._ray import add_ray_arguments

DEFAULTS: dict = {
    "root": None,
    "inputs": [],
    "shard": {},
    "features": {
        "name": "mfcc",
        "extractor": "mfcc",
        "layer": None,
        "percent": 10.0,
        "hours": None,
        "seed": 0,
        "gpus_per_worker": 0,
    },
    "kmeans": {
        "name": "mfcc100",
        "k": 100,
        "seed": 0,
        "max_iter": 100,
        "tol": 1e-4,
        "init": "k-means||",
        "algorithm": "lloyd",
        "pca": None,
        "whiten": False,
        "workers": None,
        "gpus_per_worker": 0,
    },
    "label": {
        "name": "it1",
        "fairseq_splits": {"train": 99, "valid": 1},
        "split_by": "utterance",
        "split_seed": 0,
        "dedup": False,
        "workers": None,
        "gpus_per_worker": None,
    },
    "report": {"phones": None},
    "ray": {"address": None, "num_cpus": None},
}

_SHARD_KEYS = {
    "layout", "segment", "target_seconds", "shard_bytes", "max_samples", "seed", "verify", "vad",
}  # fmt: skip


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def load_config(path: str | None, overrides: list[str]) -> dict:
    """The defaults, updated by the YAML file, then by ``a.b=value`` overrides.

    Raises:
        ConfigError: An unreadable file, an unknown key, or a malformed override.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        _merge(config, loaded, path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        tree: dict = value
        for part in reversed(key.split(".")):
            tree = {part: tree}
        _merge(config, tree, f"override {item!r}")
    if not config["root"]:
        raise ConfigError("root is required (in the config or as root=/path)")
    if not config["features"]["extractor"]:
        raise ConfigError(
            "features.extractor is required: mfcc, or the checkpoint of the last iteration "
            "as features.extractor=fairseq:/path/to/checkpoint.pt (or hf:/path)"
        )
    if isinstance(config["inputs"], str):
        config["inputs"] = [config["inputs"]]
    return config


def _merge(into: dict, new: dict, where: str, prefix: str = "") -> None:
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key not in into and not (prefix == "shard." and key in _SHARD_KEYS):
            known = ", ".join(sorted(f"{prefix}{k}" for k in into)) or ", ".join(
                sorted(f"shard.{k}" for k in _SHARD_KEYS)
            )
            raise ConfigError(f"{where}: unknown key {name!r}; known: {known}")
        if isinstance(into.get(key), dict) and not key.endswith("splits"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} is a section, got {value!r}")
            _merge(into[key], value, where, f"{name}.")
        else:
            into[key] = value


def build_parser():
    parser = _cli.parser("pipelines.hubert", __doc__)
    parser.add_argument("--config", default=None, help="YAML config (see the keys above)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    add_ray_arguments(parser)  # The same flags as every stage (ray.address=... also works).
    return parser


def _sharding_options(section: dict):
    from shards.plan import ShardingOptions, parse_size

    options = dict(section)
    if isinstance(options.get("shard_bytes"), str):
        options["shard_bytes"] = parse_size(options["shard_bytes"])
    result = ShardingOptions(**options)
    result.validate()
    return result


def run(config: dict) -> dict:
    """Runs every stage in order (Ray must be connected); returns each stage's summary."""
    from shards import storage
    from units import report
    from units.extractors import ExtractorOptions
    from units.fairseq_export import REMOTE_ROOT_HINT, export
    from units.features_ray import run as extract
    from units.kmeans import KMeans
    from units.kmeans_ray import StageOptions
    from units.kmeans_ray import run as fit_kmeans
    from units.labels_ray import run as label
    from units.sampling import SampleRequest

    root, out, started = config["root"], {}, time.monotonic()
    if config["inputs"]:
        from shards.ray_sharding import run as shard

        out["shard"] = _stage("shard", lambda: shard(
            config["inputs"], root, _sharding_options(config["shard"])
        ))  # fmt: skip
    elif not storage.exists(os.path.join(root, "manifest", "utterances.parquet")):
        raise ConfigError(f"{root} holds no shards and the config gives no inputs to shard")
    f = config["features"]
    out["features"] = _stage("features", lambda: extract(
        root,
        f["name"],
        ExtractorOptions(f["extractor"], layer=f["layer"]),
        SampleRequest(percent=None if f["hours"] else f["percent"], hours=f["hours"],
                      seed=f["seed"]),
        gpus_per_worker=f["gpus_per_worker"],
    ))  # fmt: skip
    k = config["kmeans"]
    estimator = KMeans(
        k["k"],
        init=k["init"],
        max_iter=k["max_iter"],
        tol=k["tol"],
        seed=k["seed"],
        algorithm=k["algorithm"],
    )
    options = StageOptions(
        pca=k["pca"], whiten=k["whiten"], workers=k["workers"], gpus_per_worker=k["gpus_per_worker"]
    )
    out["kmeans"] = _stage(
        "kmeans", lambda: fit_kmeans(root, f["name"], k["name"], estimator, options)
    )
    lab = config["label"]
    out["label"] = _stage("label", lambda: label(
        root, k["name"], lab["name"], workers=lab["workers"],
        gpus_per_worker=lab["gpus_per_worker"], dedup=lab["dedup"],
    ))  # fmt: skip
    if lab["fairseq_splits"] and storage.is_url(root):
        hint = REMOTE_ROOT_HINT.format(root=root)
        print(f"== fairseq: skipped, fairseq reads local files: {hint}", flush=True)
    elif lab["fairseq_splits"]:
        out["fairseq"] = _stage("fairseq", lambda: export(
            root, lab["name"], lab["fairseq_splits"], by=lab["split_by"], seed=lab["split_seed"]
        ))  # fmt: skip
    built = report.build(root, lab["name"], config["report"]["phones"])
    paths = report.write(built, os.path.join(root, "reports", lab["name"]))
    out["report"] = {"path": paths["report"], "headline": report.headline(built.metrics)}
    print(out["report"]["headline"], flush=True)
    out["wall_seconds"] = time.monotonic() - started
    return out


def _stage(name: str, call):
    started = time.monotonic()
    print(f"== {name}", flush=True)
    summary = call()
    done = summary.get("shards_written", summary.get("written", 1)) in (0, False)
    print(f"== {name}: {'already complete' if done else 'done'} in "
          f"{time.monotonic() - started:.1f} s", flush=True)  # fmt: skip
    return summary


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging()
    try:
        config = load_config(args.config, args.overrides)
        for key in ("address", "num_cpus"):
            if getattr(args, key) is not None:
                config["ray"][key] = getattr(args, key)
        if config["inputs"]:
            _sharding_options(config["shard"])
    except (ConfigError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ._ray import connect

    _cli.check_writable(config["root"], create=bool(config["inputs"]))
    connect(argparse.Namespace(**config["ray"]))
    try:
        summary = run(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, sort_keys=True, default=str))
    print(f"report: {summary['report']['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
