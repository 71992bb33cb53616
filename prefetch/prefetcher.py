"""Prefetcher: after a layer's selection is resident, queue loads for the next layers.

Layer l+1's predicted units go first (most confident first), then l+2's; nothing the
current layer uses can be evicted (its sub-experts are in use in the store), and l+2's
loads never evict l+1's predicted units. When a layer's real selection arrives, its
prediction is scored (precision, recall) and predicted loads still queued that it did
not select are cancelled.
"""

from __future__ import annotations

import logging

import torch

from edge_prism.types import SubExpertId

from .predictor import Prediction, Predictor

logger = logging.getLogger(__name__)


class Prefetcher:
    """Predict-and-load for decode tokens (a model.Prefetcher)."""

    def __init__(self, predictor: Predictor, store, *, distance: int = 2):
        self.predictor = predictor
        self.store = store
        self.distance = distance
        self.num_layers = predictor.model.spec.num_layers
        self._pending: dict[int, Prediction] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the precision/recall counters."""
        self.predicted = 0
        self.actual = 0
        self.correct = 0

    def on_selected(self, layer: int, resid: torch.Tensor, units: torch.Tensor) -> None:
        """Score the prediction for ``layer``, drop its stale loads, prefetch later layers."""
        pred = self._pending.pop(layer, None)
        actual = set(units.tolist())
        if pred is not None:
            predicted = set(pred.units.tolist())
            self.predicted += len(predicted)
            self.actual += len(actual)
            self.correct += len(predicted & actual)
            self.store.drop_stale(layer, predicted - actual)
        protect: set[SubExpertId] = set()
        for d in range(1, self.distance + 1):
            target = layer + d
            if target >= self.num_layers:
                break
            p = self.predictor.predict(layer, resid, target)
            if d == 1 or target not in self._pending:
                self._pending[target] = p  # the nearest prediction is the one scored
            self.store.prefetch(target, p.units.tolist(), protect=protect)
            S = self.predictor.model.parts[target]
            protect |= {SubExpertId(target, u // S, u % S) for u in p.units.tolist()}

    def report(self) -> dict:
        """prefetch_precision / prefetch_recall of the scored predictions."""
        return {
            "prefetch_precision": self.correct / self.predicted if self.predicted else None,
            "prefetch_recall": self.correct / self.actual if self.actual else None,
        }
