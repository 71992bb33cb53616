"""QoS planner: keep a token-latency budget by running fewer sub-experts, never stalling.

per decode token: start_token() -> per layer: time left / layers left -> this layer's
share -> predicted arrival of each missing sub-expert (cost model) + compute time ->
drop the lowest-priority sub-experts that do not fit, down to the floor (the top
sub-expert of the top expert is always computed).

Priority of a selected sub-expert = its expert's router weight x a rank weight from its
sub-expert gate score within the expert (parts are stored hottest first, so without gate
scores the part index stands in). Lowest priority is dropped first. Without a budget the
planner is not installed and nothing is dropped.

The cost model (host-to-device bandwidth, per-copy overhead, per-unit and per-layer
compute time) is measured at start-up and cached per device and model shape in the user
cache (``EDGE_PRISM_PROFILES``, else ``$EDGE_PRISM_CACHE/profiles``, else
``$XDG_CACHE_HOME/edge-prism/profiles`` or ``~/.cache/edge-prism/profiles``), never in the
source tree.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edge_prism.kernels import block_ffn

from .device import device_name as _device_name
from .device import measure_h2d_bandwidth, synchronize

logger = logging.getLogger(__name__)


@dataclass
class CostModel:
    """Measured costs on one device for one model shape."""

    device: str
    h2d_bytes_per_s: float
    copy_overhead_s: float
    unit_s: float  # compute time per selected sub-expert (decode)
    layer_fixed_s: float  # attention, norms, router: per layer per decode token
    head_s: float  # final norm and lm_head per token
    workers: int = 2
    # CUDA: time to compute one sub-expert on the host CPU from host memory (None: never)
    host_unit_s: float | None = None

    def load_s(self, nbytes: int, count: int) -> float:
        """Time until ``count`` loads of ``nbytes`` each have arrived (queued on workers)."""
        if count <= 0:
            return 0.0
        per = self.copy_overhead_s + nbytes / self.h2d_bytes_per_s
        waves = -(-count // max(self.workers, 1))
        return waves * per


def device_name(device: torch.device) -> str:
    """A stable name for cost-model caching: this CUDA ordinal's name and UUID (every Jetson
    its own, without NVML), or the CPU model (see runtime.device.device_name)."""
    return _device_name(device)


def profiles_dir() -> Path:
    """Where measured device profiles are cached: the user cache, never the source tree."""
    env = os.environ.get("EDGE_PRISM_PROFILES")
    if env:
        return Path(env)
    root = os.environ.get("EDGE_PRISM_CACHE")
    if root:
        return Path(root) / "profiles"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-prism" / "profiles"


def _cache_path(device: torch.device, signature: str) -> Path:
    # The torch version is part of the key: a new build (kernels, drivers) is measured again.
    key = f"{device_name(device)}-{signature}-torch{torch.__version__}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return profiles_dir() / f"cost-{safe}.json"


def measure_cost_model(model, *, device: torch.device, signature: str, use_cache: bool = True) -> CostModel:
    """The cost model for ``model`` on ``device``: cached, else measured now (~1 s)."""
    path = _cache_path(device, signature)
    if use_cache and path.exists():
        try:
            return CostModel(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            logger.warning("ignoring unreadable cost model %s", path)
    cost = _measure(model, device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(cost), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        logger.info("cannot cache the cost model in %s: %s", path, e)
    return cost


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def _measure(model, device: torch.device) -> CostModel:
    spec = model.spec
    bw = measure_h2d_bandwidth(device, nbytes=16 * 2**20, repeats=3)
    small = torch.empty(4096, dtype=torch.uint8).pin_memory() if device.type == "cuda" else torch.empty(4096, dtype=torch.uint8)
    dst = torch.empty(4096, dtype=torch.uint8, device=device)
    overhead = _timed(lambda: dst.copy_(small, non_blocking=True), 20, device)
    if device.type == "cpu":
        overhead = max(overhead, 20e-6)  # a worker hand-off and a pread cost more than a memcpy
    # Compute per unit: the layer with the most sub-experts per token, through its own kernel
    # on its own pool, P=1 and P=many.
    layer = max(range(spec.num_layers), key=lambda i: spec.ffn[i].top_k * model.parts[i])
    pool, kernel = model.store.pool(layer), model.kernels[layer]
    x = torch.randn(1, spec.hidden_size, device=device, dtype=model.dtype) * 0.1
    many = min(model.store.capacity(layer), max(2, spec.ffn[layer].top_k * model.parts[layer]))
    slots = torch.arange(many)

    def units(p: int):
        return kernel(x, pool, slots[:p], torch.ones(p, 1, device=device, dtype=model.dtype))

    t1, tm = _timed(lambda: units(1), 10, device), _timed(lambda: units(many), 10, device)
    unit_s = max((tm - t1) / max(many - 1, 1), 1e-7)
    # Per-layer fixed work (attention over a short cache, norms, router) and the head.
    lw = model.w.layers[layer]
    q_width = spec.num_heads * spec.head_dim
    fixed = _timed(lambda: lw.wo(lw.wqkv(x)[:, :q_width]), 10, device) * 1.5  # + attention, norms, router
    head = _timed(lambda: model.w.lm_head(x), 5, device)
    host_unit_s = None
    if device.type == "cuda" and hasattr(model.store, "host_blocks") and isinstance(pool, torch.Tensor):
        # The same block math on the host CPU, from a host copy of one float block.
        hb, hx = pool[:1].float().cpu(), x.float().cpu()
        host_unit_s = _timed(lambda: block_ffn(hx, hb, torch.ones(1, 1)), 10, torch.device("cpu"))
    return CostModel(device=device_name(device), h2d_bytes_per_s=bw, copy_overhead_s=overhead,
                     unit_s=unit_s, layer_fixed_s=fixed + t1 - unit_s, head_s=head, host_unit_s=host_unit_s)


class LatencyPlanner:
    """Trims each decode token's per-layer selection to fit ``budget_s`` (a model.Planner)."""

    def __init__(self, model, store, cost: CostModel, *, budget_s: float):
        self.model, self.store, self.cost, self.budget_s = model, store, cost, budget_s
        self.L = model.spec.num_layers
        self._t0 = time.perf_counter()
        self._mark: tuple[float, float] | None = None  # (time, predicted seconds to the next plan)
        self.scale = 1.0  # observed / predicted time, learned while decoding (kept across tokens)
        self.dropped = 0
        self.host_computed = 0
        self.tokens = 0

    def reset_stats(self) -> None:
        """Zero the drop counters."""
        self.dropped = 0
        self.host_computed = 0
        self.tokens = 0

    def start_token(self) -> None:
        """A decode token begins now."""
        self._t0 = time.perf_counter()
        self._mark = (self._t0, self.cost.layer_fixed_s)  # embedding and layer 0's attention
        self.tokens += 1

    def _observe(self, now: float) -> None:
        # Closed loop: the start-up cost model misses loads, gathers and contention, so the
        # time since the last decision is compared with what it predicted and the ratio
        # (smoothed, clamped) scales every later estimate.
        if self._mark is not None and self._mark[1] > 0:
            ratio = (now - self._mark[0]) / self._mark[1]
            self.scale = 0.7 * self.scale + 0.3 * min(max(ratio, 0.1), 100.0)

    def _share(self, layer: int, now: float) -> float:
        """This layer's FFN time budget, in the cost model's (unscaled) seconds."""
        c = self.cost
        left = self.budget_s / self.scale - (now - self._t0) / self.scale - c.head_s
        layers_left = self.L - layer
        return (left - (layers_left - 1) * c.layer_fixed_s) / layers_left

    def priorities(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor,
                   topi: torch.Tensor) -> torch.Tensor:
        """Priority of each selected unit [P] (router weight x gate-rank weight)."""
        S = self.model.parts[layer]
        part = units % S
        rank = part.float()
        scores = self.model.part_scores(layer, x, topi)  # [1, k, S] or None
        if scores is not None:
            ranks = scores[0].argsort(dim=-1, descending=True, stable=True).argsort(dim=-1).float().cpu()  # [k, S]
            expert_rank = {int(e): j for j, e in enumerate(topi[0].tolist())}
            rows = torch.tensor([expert_rank[int(u) // S] for u in units.tolist()])
            rank = ranks[rows, part]
        return wt[:, 0].float().cpu() * (1.0 - rank / (2 * S))

    def plan(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor,
             topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which of ``units`` to compute within this layer's share of the budget.

        Returns (device units, their weights, host units, their weights): a missing
        sub-expert is computed on the host CPU from host memory instead of waiting for its
        copy when the cost model says that is faster (CUDA); the rest that do not fit are
        dropped, lowest priority first, never the top one.
        """
        empty = units[:0], wt[:0]
        P = units.shape[0]
        now = time.perf_counter()
        self._observe(now)
        share = self._share(layer, now)
        c = self.cost
        nbytes = self.store.block_nbytes(layer)
        ready = [self.store.ready(layer, int(u)) for u in units.tolist()]
        everything = c.load_s(nbytes, ready.count(False)) + P * c.unit_s
        if everything <= share:
            self._mark = (now, everything + c.layer_fixed_s)
            return units, wt, *empty
        host_ok = c.host_unit_s is not None and hasattr(self.store, "host_blocks")
        order = torch.argsort(self.priorities(layer, x, units, wt, topi), descending=True, stable=True)
        keep, host, missing, host_s = [], [], 0, 0.0
        for rank, i in enumerate(order.tolist()):
            with_it = missing + (0 if ready[i] else 1)
            # Host and device work run side by side: the layer takes the longer of the two.
            on_device = max(c.load_s(nbytes, with_it) + (len(keep) + 1) * c.unit_s, host_s)
            on_host = (max(c.load_s(nbytes, missing) + len(keep) * c.unit_s, host_s + c.host_unit_s)
                       if host_ok and not ready[i] else float("inf"))
            if min(on_device, on_host) > share and rank > 0:  # the floor is always computed
                continue
            if on_host < on_device:
                host.append(i)
                host_s += c.host_unit_s
            else:
                keep.append(i)
                missing = with_it
        self.dropped += P - len(keep) - len(host)
        self.host_computed += len(host)
        planned = max(c.load_s(nbytes, missing) + len(keep) * c.unit_s, host_s)
        self._mark = (now, planned + c.layer_fixed_s)  # this FFN and the next layer's attention
        dev, hst = torch.tensor(sorted(keep), dtype=torch.long), torch.tensor(sorted(host), dtype=torch.long)
        return units[dev], wt[dev], units[hst], wt[hst]

    def report(self, latencies_s: list[float]) -> dict:
        """Drop counters and the share of decode tokens within the budget."""
        within = sum(1 for t in latencies_s if t <= self.budget_s)
        return {
            "token_latency_budget_ms": self.budget_s * 1000,
            "dropped_subexperts": self.dropped,
            "dropped_subexperts_per_token": self.dropped / self.tokens if self.tokens else 0.0,
            "tokens_within_budget": within / len(latencies_s) if latencies_s else None,
            "cpu_computed_subexperts": self.host_computed,
        }
