"""The stages after shards, in rooms by job: ``features``, ``kmeans``, ``labels``, ``quality``;
``stage`` is the engine that runs the shard-streaming stages of the first and third."""


def project_version() -> str:
    """The installed unitpipe version, recorded in every stage's lineage."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unitpipe")
    except PackageNotFoundError:
        return "unknown"
