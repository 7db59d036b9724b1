"""Features, feature store, k-means, labels, exports and metrics (the stages after shards)."""


def project_version() -> str:
    """The installed unitpipe version, recorded in every stage's lineage."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unitpipe")
    except PackageNotFoundError:
        return "unknown"
