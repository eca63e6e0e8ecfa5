"""mfpipe: learn user and movie embeddings from rating data on Dask."""

__version__ = "0.1.0"
