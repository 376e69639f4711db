"""Stage 4, load_vectors: `load` checks and bulk-loads feature files, `hnsw` keeps the search index."""

from .load import LoadStats, load_batch, load_vectors

__all__ = ["LoadStats", "load_batch", "load_vectors"]
