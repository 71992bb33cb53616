"""Prefetcher: after a layer's selection is resident, queue loads for the next layers.

Layer l+1's predicted units go first (most confident first), then l+2's; nothing the
current layer uses can be evicted (its sub-experts are in use in the store), and l+2's
loads never evict l+1's predicted units. When a layer's real selection arrives, its
prediction is scored (precision, recall) and predicted loads still queued that it did
not select are cancelled.

Order within layer l on a GPU: the predictions are queued on the device before l's FFN
kernel (they are small and come back in one copy), the kernel is launched, and only then
does the host wait for the predictions and issue the loads, while the device computes
the FFN. On the CPU, where nothing runs ahead, loads are issued before the kernel so the
transfer workers read while the kernel computes. Loads are speculative: the runtime
serves them after every demand load.
"""

from __future__ import annotations

import logging

import torch

from edge_prism.runtime.device import is_async
from edge_prism.types import SubExpertId

from .predictor import PendingPredictions, Prediction, Predictor

logger = logging.getLogger(__name__)


class Prefetcher:
    """Predict-and-load for decode tokens (a model.Prefetcher)."""

    def __init__(self, predictor: Predictor, store, *, distance: int = 2):
        self.predictor = predictor
        self.store = store
        self.distance = distance
        model = predictor.model
        self.num_layers = model.spec.num_layers
        self._parts = list(model.parts)
        self._ahead = is_async(model.device)  # loads issued after the kernel's launch
        self._pending: dict[int, Prediction] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the precision/recall counters."""
        self.predicted = 0
        self.actual = 0
        self.correct = 0

    def release_all(self) -> None:
        """Forget predictions not yet scored (a step was interrupted, or a generation starts)."""
        self._pending.clear()

    def before_kernel(self, layer: int, resid: torch.Tensor, units: torch.Tensor) -> PendingPredictions | None:
        """Score the prediction for ``layer``, drop its stale loads, predict later layers.

        Returns the predictions for :meth:`after_kernel` on a GPU; on the CPU their loads
        are issued now and None is returned.
        """
        pred = self._pending.pop(layer, None)
        if pred is not None:
            actual = set(units.tolist())
            predicted = set(pred.units.tolist())
            self.predicted += len(predicted)
            self.actual += len(actual)
            self.correct += len(predicted & actual)
            self.store.drop_stale(layer, predicted - actual)
        targets = [layer + d for d in range(1, self.distance + 1) if layer + d < self.num_layers]
        if not targets:
            return None
        pending = self.predictor.predict_many(layer, resid, targets)
        if self._ahead:
            return pending
        self.after_kernel(pending)
        return None

    def after_kernel(self, pending: PendingPredictions | None) -> None:
        """Issue the predicted loads, nearest layer first."""
        if pending is None:
            return
        protect: set[SubExpertId] = set()
        for d, p in enumerate(pending.wait()):
            if d == 0 or p.layer not in self._pending:
                self._pending[p.layer] = p  # the nearest prediction is the one scored
            units = p.units.tolist()
            self.store.prefetch(p.layer, units, protect=protect)
            S = self._parts[p.layer]
            protect |= {SubExpertId(p.layer, u // S, u % S) for u in units}

    def on_selected(self, layer: int, resid: torch.Tensor, units: torch.Tensor) -> None:
        """Both steps at once (no kernel in between)."""
        self.after_kernel(self.before_kernel(layer, resid, units))

    def report(self) -> dict:
        """prefetch_precision / prefetch_recall of the scored predictions."""
        return {
            "prefetch_precision": self.correct / self.predicted if self.predicted else None,
            "prefetch_recall": self.correct / self.actual if self.actual else None,
        }
