"""d2v: data2vec 2.0 for image, speech and text, as a reproducible pipeline."""

__version__ = "0.1.0"
