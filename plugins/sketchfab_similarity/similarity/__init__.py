"""Stage 5, refresh_similarity: `refresh` is the stage's entry; `plan` reads what changed, `compute`
computes a part's lists, `publish` stages them and publishes the run; `topn` is the exact top-N
kernel on the CPU, `topn_keras` the same on a Keras device (GPU), proven and rescored exactly."""

from .refresh import RefreshStats, refresh_similarity

__all__ = ["RefreshStats", "refresh_similarity"]
