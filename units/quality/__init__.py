"""Unit quality: PNMI and purity metrics, reference phone alignments, and the report."""
