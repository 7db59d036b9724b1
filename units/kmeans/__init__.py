"""Unit discovery, one module per job: the k-means estimator (``estimator``), its parts and
tree sums that make centroids identical for any number of workers (``parts``, ``tree_sum``),
PCA (``pca``), the Ray transport that spreads parts over actors (``transport``), the stage
that fits a feature store (``stage``) and its fairseq export (``fairseq``)."""
