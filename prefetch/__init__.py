"""Activation-predictor prefetching.

residual at layer l -> [Predictor: layer l+d's norm, router and sub-expert gate applied
early, optional affine correction] -> ranked units for l+1, l+2 -> [Prefetcher] ->
store.prefetch (transfer queue, never evicting the current layer's sub-experts)
"""

from .predictor import Prediction, Predictor, fit_correction
from .prefetcher import Prefetcher

__all__ = ["Prediction", "Predictor", "Prefetcher", "fit_correction"]
