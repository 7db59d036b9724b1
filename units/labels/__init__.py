"""Labels and what trainers read: the label pass, fairseq exports, wav2vec-U preparation,
and the PyTorch dataset over label sets."""
