"""Features, feature store, k-means, labels, exports and metrics (the stages after shards)."""
