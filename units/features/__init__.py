"""Features: Kaldi MFCC/fbank, SSL model layers, checkpoint loading, the extractor that a
stage builds from its name, the seeded sample, and the feature store with its stage."""
