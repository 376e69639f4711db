"""Stage 3, extract_features: `extract` is the pipeline, `engines` run the model, `vgg16` builds it.

`reference` (the blog post's per-image path) is for tests and benchmarks only.
"""

from .extract import ExtractResult, FeatureExtractor, PendingImage, extract_features, pending_extractions

__all__ = ["ExtractResult", "FeatureExtractor", "PendingImage", "extract_features", "pending_extractions"]
