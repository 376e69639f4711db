"""Stage 5, refresh_similarity: `refresh` plans, stages and publishes; `topn` is the exact top-N
kernel on the CPU, `topn_keras` the same on a Keras device (GPU), proven and rescored exactly."""

from .refresh import RefreshStats, refresh_similarity

__all__ = ["RefreshStats", "refresh_similarity"]
