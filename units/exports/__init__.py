"""Exports of a label set for trainers outside fairseq: lhotse, NeMo, Hugging Face datasets."""
