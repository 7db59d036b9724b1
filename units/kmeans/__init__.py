"""Unit discovery: the k-means estimator, its parts and tree sums (identical centroids for
any number of workers), PCA, and the stage that distributes them over Ray actors."""
