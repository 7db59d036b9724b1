"""BEST-RQ targets: a random-projection quantizer made from a seed and a sample's statistics."""
