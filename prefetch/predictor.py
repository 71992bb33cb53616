"""Predict the sub-experts a later layer will select, from the residual stream now.

The residual stream changes slowly across layers, so layer l+d's own FFN norm, router
and sub-expert gate applied to the residual after layer l's attention predict what l+d
will select. A small per-layer map fitted in closed form at refactor time (per hidden
dimension: y ~ scale * x + bias, least squares over calibration tokens) corrects the
residual's drift over the d layers in between; it is optional and stored in the prism
checkpoint as ``layers.L.predict.D.scale`` / ``.bias``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from edge_prism.model import Transformer, _rms
from edge_prism.runtime.device import HostCopy


@dataclass
class Prediction:
    """Units (e*S+s) a layer is predicted to select, most confident first."""

    layer: int
    units: torch.Tensor  # [P] int64, CPU
    confidence: torch.Tensor  # [P] in [0, 1]


class RegressionStats:
    """Streaming sums for a per-dimension least-squares fit y ~ a*x + b."""

    def __init__(self, dim: int):
        self.n = 0
        self.sx = torch.zeros(dim, dtype=torch.float64)
        self.sy = torch.zeros(dim, dtype=torch.float64)
        self.sxx = torch.zeros(dim, dtype=torch.float64)
        self.sxy = torch.zeros(dim, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows x, y [T, D]."""
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += (x * x).sum(0)
        self.sxy += (x * y).sum(0)


def fit_correction(stats: RegressionStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form per-dimension scale and bias [D] (identity where x does not vary)."""
    n = max(stats.n, 1)
    var = stats.sxx - stats.sx * stats.sx / n
    cov = stats.sxy - stats.sx * stats.sy / n
    scale = torch.where(var > 1e-12 * n, cov / var.clamp_min(1e-30), torch.ones_like(var))
    bias = (stats.sy - scale * stats.sx) / n
    return scale.float(), bias.float()


class PendingPredictions:
    """Predictions computed on the device and on their way to the host in one copy."""

    def __init__(self, targets: list[int], sizes: list[int], packed: torch.Tensor):
        self.targets, self.sizes = targets, sizes
        self._copy = HostCopy(packed)  # [2 * sum(sizes)] float64: units then confidences per target

    def wait(self) -> list[Prediction]:
        """The predictions (blocks only until the one copy has landed)."""
        host = self._copy.wait()
        out, at = [], 0
        for target, n in zip(self.targets, self.sizes):
            units, conf = host[at:at + n], host[at + n:at + 2 * n]  # sorted by confidence, best first
            at += 2 * n
            keep = int((conf > 0).sum())  # host tensors: no device sync
            out.append(Prediction(target, units[:keep].long(), conf[:keep].float()))
        return out


class Predictor:
    """Applies later layers' routers and gates to the current residual stream.

    Holds the model weakly: the model holds its prefetcher, which holds this.
    """

    def __init__(self, model: Transformer, corrections: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
                 | None = None):
        self._model = weakref.ref(model)
        self.corrections = corrections or {}

    @property
    def model(self) -> Transformer:
        """The model whose layers are applied early."""
        model = self._model()
        if model is None:
            raise RuntimeError("the predictor's model is gone")
        return model

    def predict(self, layer: int, resid: torch.Tensor, target: int) -> Prediction:
        """What ``target`` (> layer) will select, from ``resid`` [1, D] after ``layer``'s attention."""
        return self.predict_many(layer, resid, [target]).wait()[0]

    def predict_many(self, layer: int, resid: torch.Tensor, targets: list[int]) -> PendingPredictions:
        """Predictions for each of ``targets``, queued on the device with one copy to the host
        (no host sync here: boolean masks and per-tensor ``.cpu()`` would each be one)."""
        parts, sizes = [], []
        for target in targets:
            units, conf = self._ranked(layer, resid, target)  # [k*S], [k*S]
            parts += [units.double(), conf.double()]
            sizes.append(units.shape[0])
        return PendingPredictions(list(targets), sizes, torch.cat(parts))

    def _ranked(self, layer: int, resid: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every routed unit of ``target`` and its confidence, most confident first (device)."""
        m = self.model
        h = resid
        corr = self.corrections.get((layer, target - layer))
        if corr is not None:
            h = h * corr[0].to(h.dtype) + corr[1].to(h.dtype)  # [1, D]
        x = _rms(h, m.w.layers[target].ffn_norm, m.spec.rms_norm_eps)  # [1, D] (compute dtype)
        topv, topi = m.route(target, x)  # [1, k]
        S = m.parts[target]
        selector = m.selector_for(target)
        if selector is None:
            w = topv[:, :, None].expand(1, topi.shape[1], S)  # [1, k, S]
        else:
            w = selector(target, x, topv, topi)  # [1, k, S]
        units = (topi[:, :, None] * S + torch.arange(S, device=x.device)).reshape(-1)  # [k*S]
        # Parts are stored hottest first: within an expert, earlier parts rank higher.
        hot = 1.0 - torch.arange(S, device=x.device, dtype=torch.float32) / (2 * S)  # [S]
        conf = (w.float() * hot).reshape(-1)  # [k*S], 0 = not selected
        order = torch.argsort(conf, descending=True, stable=True)  # [k*S]
        return units[order], conf[order]
