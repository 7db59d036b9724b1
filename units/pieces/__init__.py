"""HuBERT-AP acoustic pieces (Ren et al., Interspeech 2022): a sentencepiece model over
deduplicated unit sequences, and every utterance of a label set encoded with it."""
