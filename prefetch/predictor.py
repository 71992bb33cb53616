"""Predict the sub-experts a later layer will select, from the residual stream now.

The residual stream changes slowly across layers, so layer l+d's own FFN norm, router
and sub-expert gate applied to the residual after layer l's attention predict what l+d
will select. A small per-layer map fitted in closed form at refactor time (per hidden
dimension: y ~ scale * x + bias, least squares over calibration tokens) corrects the
residual's drift over the d layers in between; it is optional and stored in the prism
checkpoint as ``layers.L.predict.D.scale`` / ``.bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_prism.model import Transformer, _rms


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


class Predictor:
    """Applies later layers' routers and gates to the current residual stream."""

    def __init__(self, model: Transformer, corrections: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
                 | None = None):
        self.model = model
        self.corrections = corrections or {}

    def predict(self, layer: int, resid: torch.Tensor, target: int) -> Prediction:
        """What ``target`` (> layer) will select, from ``resid`` [1, D] after ``layer``'s attention."""
        m = self.model
        h = resid
        corr = self.corrections.get((layer, target - layer))
        if corr is not None:
            h = h * corr[0].to(h.dtype) + corr[1].to(h.dtype)  # [1, D]
        x = _rms(h, m.w.layers[target].ffn_norm, m.spec.rms_norm_eps)  # [1, D]
        topv, topi = m.route(target, x)  # [1, k]
        S = m.parts[target]
        if m.selector is None:
            w = topv[:, :, None].expand(1, topi.shape[1], S)  # [1, k, S]
        else:
            w = m.selector(target, x, topv, topi)  # [1, k, S]
        units = (topi[:, :, None] * S + torch.arange(S, device=x.device)).reshape(-1)  # [k*S]
        # Parts are stored hottest first: within an expert, earlier parts rank higher.
        hot = 1.0 - torch.arange(S, device=x.device, dtype=torch.float32) / (2 * S)  # [S]
        conf = (w.float() * hot).reshape(-1)  # [k*S]
        keep = conf > 0
        units, conf = units[keep], conf[keep]
        order = torch.argsort(conf, descending=True, stable=True)
        return Prediction(target, units[order].cpu(), conf[order].cpu())
