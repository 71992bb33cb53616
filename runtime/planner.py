"""QoS planner: keep a token-latency budget by running fewer sub-experts, never stalling.

per decode token: start_token() -> per layer: measure the last segment (OnlineCost learns
fixed + per-resident + per-missing time) -> this layer's sub-experts in operating-point
order and the cost of each prefix -> the time left (less a miss-rate slack), less the
fixed cost of the layers to come -> the largest operating point this layer and the later
ones (at their previous token's costs) fit in, never below the floor -> keep that prefix,
longer where the time left allows -> end_token() learns the head's time and the slack.

Without a budget the planner is not installed and nothing is dropped.

The start-up cost model (host-to-device bandwidth, per-copy overhead, per-unit and
per-layer compute time) seeds the online fit; it is measured once and cached per device and model shape in the user
cache (``EDGE_PRISM_PROFILES``, else ``$EDGE_PRISM_CACHE/profiles``, else
``$XDG_CACHE_HOME/edge-prism/profiles`` or ``~/.cache/edge-prism/profiles``), never in the
source tree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import torch

from edge_prism.errors import ConfigError
from edge_prism.kernels import block_ffn

from .device import device_name as _device_name
from .device import HostCopy, measure_h2d_bandwidth, synchronize, to_device_async

logger = logging.getLogger(__name__)


@dataclass
class CostModel:
    """Measured costs on one device for one model shape (the online fit's start)."""

    device: str
    h2d_bytes_per_s: float
    copy_overhead_s: float
    unit_s: float  # compute time per selected sub-expert (decode)
    layer_fixed_s: float  # attention, norms, router: per layer per decode token
    head_s: float  # final norm and lm_head per token
    # Loads at once when the planner is not told its transfer engine's lanes (LatencyPlanner's
    # load_lanes): kept for profiles cached before it was.
    workers: int = 2
    # CUDA: time to compute one sub-expert on the host CPU from a float block in host memory
    # (None: never). Measured profiles also give what comes before it; a hand-made one without
    # them counts everything in host_unit_s.
    host_unit_s: float | None = None
    # one block out of the host tier: pread (file) or memcpy (RAM), with the tier's conversion
    host_read_s: float | None = None
    host_convert_s: float | None = None  # one block into float32 for the host FFN (none for float32 blocks)
    d2h_s: float | None = None  # x's copy to the host (None: copy_overhead_s)
    h2d_result_s: float | None = None  # the host result's copy back (None: copy_overhead_s)
    # per layer below full K: its sub-experts chosen by gate score (None: not measured)
    select_s: float | None = None

    def load_s(self, nbytes: int, count: int, lanes: int | None = None) -> float:
        """Time until ``count`` loads of ``nbytes`` each have arrived, ``lanes`` at a time (one
        FIFO copy stream: 1; None: ``workers``)."""
        if count <= 0:
            return 0.0
        per = self.copy_overhead_s + nbytes / self.h2d_bytes_per_s
        waves = -(-count // max(self.workers if lanes is None else lanes, 1))
        return waves * per

    @property
    def host_s(self) -> float | None:
        """One sub-expert on the host: read + convert + FFN (None: no host path)."""
        if self.host_unit_s is None:
            return None
        return self.host_unit_s + (self.host_read_s or 0.0) + (self.host_convert_s or 0.0)

    @property
    def d2h(self) -> float:
        """Seconds of x's copy to the host."""
        return self.copy_overhead_s if self.d2h_s is None else self.d2h_s

    @property
    def h2d_result(self) -> float:
        """Seconds of the host result's copy back to the device."""
        return self.copy_overhead_s if self.h2d_result_s is None else self.h2d_result_s


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


# Profiles of an older cost model are measured again (2: the host path's reads, conversions
# and copies; 3: per-unit and per-layer time from whole decode tokens; 4: the selection's
# time per layer below full K).
COST_MODEL_VERSION = 4


def _cache_path(device: torch.device, signature: str) -> Path:
    # The torch version is part of the key: a new build (kernels, drivers) is measured again.
    key = f"{device_name(device)}-{signature}-torch{torch.__version__}-v{COST_MODEL_VERSION}"
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


def check_budget_ms(ms) -> None:
    """A ConfigError unless ``ms`` is a token-latency budget: a finite number of milliseconds > 0
    (None, no budget, passes)."""
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, Real) or not math.isfinite(ms)
                           or ms <= 0):
        raise ConfigError(f"invalid token latency budget {ms!r} ms: use a positive number of milliseconds")


def transfer_lanes(store) -> int | None:
    """How many missing sub-experts ``store``'s transfer engine loads at once (the fewest over
    its slot pools); None when it has none (everything resident) or does not say.

    An asynchronous device (CUDA): 1. Every demand copy runs on the one demand copy stream,
    first in first out, whether issued straight from a RAM tier (the direct path) or by a
    worker after its pread into pinned staging (whose reads overlap the copies: a per-miss
    time the one-lane fit learns). The CPU: the workers and the waiting compute thread, each
    reading a block straight into its slot.

    Stores that load nothing (everything resident) have no ``load_lanes``.
    """
    own = getattr(store, "load_lanes", None)
    return None if own is None else max(int(own()), 1)


def planner_for(model, *, budget_s: float, device: torch.device, dtype: torch.dtype):
    """The planner for ``model`` from its device's cost model (measured once, cached per
    device and model shape): where its store streams sub-experts (a miss costs a load, or
    may run on the host), a LatencyPlanner over its transfer lanes, planning each layer;
    where it does not (everything resident, or the CPU reading misses in place), a
    runtime.token_planner.TokenPlanner, choosing each layer's operating point."""
    s = model.spec
    # The FFN kernel is part of the key: whole resident experts and per-unit calls on a slot
    # pool cost differently per sub-expert.
    signature = (f"{s.family}-L{s.num_layers}-D{s.hidden_size}-W{max(f.width for f in s.ffn)}-"
                 f"S{max(model.parts)}-{str(dtype).removeprefix('torch.')}-{type(model.kernels[0]).__name__}")
    cost = measure_cost_model(model, device=device, signature=signature)
    if not model.store.streams:
        from .token_planner import TokenPlanner

        return TokenPlanner(model, cost, budget_s=budget_s)
    return LatencyPlanner(model, model.store, cost, budget_s=budget_s)  # lanes from the store


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
    layer = max(range(spec.num_layers), key=lambda i: spec.ffn[i].top_k * model.parts[i])
    pool = model.store.pool(layer)
    x = torch.randn(1, spec.hidden_size, device=device, dtype=model.dtype) * 0.1
    head = _timed(lambda: model.w.lm_head(x), 5, device)
    # Per unit and per layer from whole decode tokens; where that cannot run, from the
    # kernel and the attention projections timed alone.
    decode = _measure_decode(model, device, head)
    unit_s, layer_fixed, select = decode if decode is not None else (*_measure_parts(model, layer, x, device), None)
    host = {}
    if (device.type == "cuda" and hasattr(model.store, "host_blocks") and isinstance(pool, torch.Tensor)
            and pool.dtype.is_floating_point):
        host = _measure_host(model, layer, x, device)
    return CostModel(device=device_name(device), h2d_bytes_per_s=bw, copy_overhead_s=overhead,
                     unit_s=unit_s, layer_fixed_s=layer_fixed, head_s=head, select_s=select, **host)


def _measure_parts(model, layer: int, x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(per sub-expert, per layer fixed) seconds from ``layer``'s FFN kernel on its own pool at
    P=1 and P=many, and its attention projections, timed alone."""
    spec = model.spec
    pool, kernel = model.store.pool(layer), model.kernels[layer]
    many = min(model.store.capacity(layer), max(2, spec.ffn[layer].top_k * model.parts[layer]))
    slots = torch.arange(many)

    def units(p: int):
        return kernel(x, pool, slots[:p], torch.ones(p, 1, device=device, dtype=model.dtype))

    t1, tm = _timed(lambda: units(1), 10, device), _timed(lambda: units(many), 10, device)
    unit_s = max((tm - t1) / max(many - 1, 1), 1e-7)
    # Per-layer fixed work (attention over a short cache, norms, router).
    lw = model.w.layers[layer]
    # wo takes the heads' outputs: head_dim wide each, or v_head_dim with latent attention (MLA).
    o_width = spec.num_heads * (spec.mla.v_head_dim if spec.mla is not None else spec.head_dim)
    o_in = torch.zeros(1, o_width, device=device, dtype=model.dtype)
    fixed = _timed(lambda: (lw.wqkv(x), lw.wo(o_in)), 10, device) * 1.5  # + attention, norms, router
    return unit_s, fixed + t1 - unit_s


class _KeepShare:
    """A model.Planner that keeps the first ``share`` of every layer's selection (measurement)."""

    trims = True

    def __init__(self, share: float):
        self.share, self.kept = share, 0  # sub-experts kept in the last token

    def start_token(self) -> None:
        self.kept = 0

    def end_token(self) -> None:
        pass

    def reset_stats(self) -> None:
        pass

    def operating_point(self, layer: int) -> None:
        return None

    def plan(self, layer, x, units, wt, topi):
        n = max(1, math.ceil(self.share * units.shape[0])) if units.shape[0] else 0
        self.kept += n
        return units[:n], wt[:n], units[:0], wt[:0]


def _measure_decode(model, device: torch.device, head_s: float, tokens: int = 6
                    ) -> tuple[float, float, float | None] | None:
    """(per sub-expert, per layer fixed, per layer selecting below full K) seconds of real
    decode tokens: the model's own path, Python, selection and store bookkeeping included,
    which a kernel timed alone leaves out (on the default model at a 25% budget: 14 us a
    unit alone against ~40 us in a token, and a third of the per-layer time). Tokens keeping
    every selected sub-expert against tokens keeping half: token = L x fixed + units x unit
    + head. Then tokens at half the operating point, chosen by the model's own selector
    (gate scores, no planner), against the tokens keeping the first half: what choosing
    costs a layer (None without gates). None where it cannot run."""
    if model.planner is not None or model.cache.length:
        return None  # a planner of its own, or a conversation under way: not disturbed
    ids = torch.arange(1, 9) % model.spec.vocab_size
    keep = {1.0: _KeepShare(1.0), 0.5: _KeepShare(0.5)}
    times: dict[float, list[float]] = {1.0: [], 0.5: [], 0.0: []}
    kept: dict[float, list[int]] = {1.0: [], 0.5: []}
    point = model.operating_point
    half = None if model.gates is None or point is None or point < 2 else -(-point // 2)
    try:
        model.forward(ids)
        for i in range(tokens):
            for share, planner in keep.items():
                model.set_planner(planner)
                t = time.perf_counter()
                model.forward(ids[i % 8:i % 8 + 1])
                synchronize(device)
                times[share].append(time.perf_counter() - t)
                kept[share].append(planner.kept)
            if half is not None:
                model.set_planner(None)
                model.set_operating_point(half)
                model.set_layer_points([half] * model.spec.num_layers)  # every layer selecting, as counted below
                t = time.perf_counter()
                model.forward(ids[i % 8:i % 8 + 1])
                synchronize(device)
                times[0.0].append(time.perf_counter() - t)
                model.set_operating_point(point)
    finally:
        model.set_planner(None)
        if point is not None:
            model.set_operating_point(point)
        model.reset()
    full, half_t = (sorted(times[s])[tokens // 2] for s in (1.0, 0.5))
    n_full, n_half = (sorted(kept[s])[tokens // 2] for s in (1.0, 0.5))
    if n_full <= n_half:
        return None  # nothing to drop (every layer keeps one): no per-unit time to see
    unit = max((full - half_t) / (n_full - n_half), 1e-7)
    fixed = max((full - head_s - unit * n_full) / model.spec.num_layers, 1e-6)
    select = None
    if half is not None:
        from edge_prism.allocation import layer_units

        at_half, at_full = layer_units(model.spec, model.parts, half), layer_units(model.spec, model.parts, point)
        selecting = sum(a < f for a, f in zip(at_half, at_full))
        if selecting:
            chosen = sorted(times[0.0])[tokens // 2] - unit * (sum(at_half) - n_half)
            select = max((chosen - half_t) / selecting, 0.0)
    return unit, fixed, select


def _measure_host(model, layer: int, x: torch.Tensor, device: torch.device) -> dict:
    """The host path of ``layer`` as Transformer._host_units runs it, step by step: x's copy to
    the host; per unit, its block out of the host tier (pread from the file tier or a copy out
    of the RAM tier, and the tier's conversion), its conversion to float32 and its host FFN;
    the result's copy back to ``device``. CostModel fields."""
    cpu = torch.device("cpu")
    store = model.store
    n = min(4, model.spec.ffn[layer].num_experts * model.parts[layer])  # a few units, as a plan sends
    units = list(range(n))
    read = _timed(lambda: store.host_blocks(layer, units), 5, cpu) / n
    block = store.host_blocks(layer, units[:1])
    convert = _timed(lambda: block.float(), 10, cpu) if block.dtype != torch.float32 else 0.0
    hb, hx = block.float(), x.float().cpu()
    ffn = _timed(lambda: block_ffn(hx, hb, torch.ones(1, 1)), 10, cpu)
    d2h = _timed(lambda: HostCopy(x).wait(), 10, device)
    y = torch.zeros(1, x.shape[-1])
    h2d = _timed(lambda: to_device_async(y, device, x.dtype), 10, device)
    return dict(host_unit_s=ffn, host_read_s=read, host_convert_s=convert, d2h_s=d2h, h2d_result_s=h2d)


class RidgeFit:
    """Three terms ``theta`` of y = theta . x, fitted online by exponentially weighted ridge
    regression towards a start-up guess ``theta0`` (information form, 3x3 solve in plain
    Python: in torch ops a fit per layer per token cost ~0.1 ms a layer).

    The prior says each term is within about ``scale`` of its start-up value, in units of
    the measurement ``noise``. Weak on purpose: along a direction the samples excite the
    data decide, and along one they never excite the fit stays at the point nearest the
    start-up terms however weak the prior. It is kept, not forgotten, so that a direction
    the samples never excite (every token at the same operating point, or nothing missing)
    stays where the start-up measured it instead of drifting (plain RLS with forgetting
    drifted along it: fixed 0.001 ms, per unit 0.12 ms where the start-up measured 0.25 and
    0.034, and every token dropped to the floor).
    """

    def __init__(self, theta0, *, scale, noise: float, forget: float = 0.98):
        self.theta = [float(t) for t in theta0]
        self._theta0 = list(self.theta)
        self._prior = [(noise / max(float(c), 1e-7)) ** 2 for c in scale]  # precision, diagonal
        # information form: R = X^T W X + prior, r = X^T W y + prior x theta0
        self.R = [[self._prior[i] if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.r = [self._prior[i] * self._theta0[i] for i in range(3)]
        self.forget = forget

    def update(self, x: tuple[float, float, float], y: float, count: int = 1) -> None:
        """``count`` samples of ``x`` whose ys sum to ``y`` (forgetting applied ``count`` times)."""
        lam, prior, theta0 = self.forget ** count, self._prior, self._theta0
        R = [[lam * self.R[i][j] + count * x[i] * x[j] + ((1 - lam) * prior[i] if i == j else 0.0)
              for j in range(3)] for i in range(3)]
        r = [lam * self.r[i] + x[i] * y + (1 - lam) * prior[i] * theta0[i] for i in range(3)]
        self.R, self.r = R, r
        theta = _solve3(R, r)
        if theta is not None:
            self.theta = theta


class OnlineCost:
    """The time of a decode layer segment, from fitted terms refreshed while decoding.

    A segment runs from one layer's plan to the next: this layer's FFN over the sub-experts
    kept (``n_ready`` resident, ``n_missing`` still to load on the device, ``n_host``
    computed on the host CPU instead), then the next layer's attention, norms and router:

        device = ready_s * (n_ready + n_missing) + load_s * ceil(n_missing / lanes)
        host   = d2h_s + host_s * n_host                          (0 without host units)
        t      = fixed + max(device, host) + (h2d_s if n_host else 0)

    A missing sub-expert is computed like a resident one once its load has landed, and the
    loads run ``lanes`` at a time: on a CUDA device every demand copy waits its turn on one
    FIFO copy stream (lanes = 1, so two misses cost twice one), on the CPU the transfer
    workers read blocks into slots in parallel. The host side starts with x's copy to the
    host (queued ahead of the device kernels), then reads, converts and computes each of its
    blocks; the next layer waits for its result's copy back, which no device work hides.

    The fitted terms stay separate: fixed, ready_s, load_s (``missing_s`` = ready_s +
    load_s, one miss alone) by exponentially weighted ridge regression towards the start-up
    terms over the segments the host took no part in (forgetting old tokens, so the fit
    follows contention and the page cache), and
    host_s by a running average over the segments it did, all starting from the start-up
    measurement. One scale over the whole prediction, as before, let the fixed part dominate
    once the FFN was trimmed and over-dropped; separate terms keep a trimmed layer's
    prediction right. The copies d2h_s and h2d_s are measured once, not fitted.
    """

    HOST_GAIN = 0.2  # weight of one segment in the running average of host_s
    HOST_MARGIN = 0.1  # a host-bound segment is this share longer than the device prediction

    def __init__(self, fixed_s: float, ready_s: float, missing_s: float, *, lanes: int = 1,
                 host_s: float | None = None, d2h_s: float = 0.0, h2d_s: float = 0.0, forget: float = 0.98):
        if lanes < 1:
            raise ConfigError(f"invalid number of load lanes {lanes}: use 1 or more")
        self.lanes = int(lanes)
        # Prior: each term within about its own size of the start-up measurement (the load
        # term within a miss's), in units of a 1% measurement noise (see RidgeFit).
        noise = max(0.01 * (fixed_s + 8 * ready_s), 1e-6)
        self._fit = RidgeFit((fixed_s, ready_s, float(missing_s) - float(ready_s)),
                             scale=(fixed_s, ready_s, max(missing_s, ready_s)), noise=noise, forget=forget)
        self.host_s = None if host_s is None else max(float(host_s), 1e-7)
        self.d2h_s, self.h2d_s = float(d2h_s), float(h2d_s)

    # The fit itself may wander below zero while the data cannot separate the terms (nothing
    # dropped, nothing missing); what is used is never below a microsecond-scale floor.
    @property
    def fixed_s(self) -> float:
        return max(self.theta[0], 1e-6)

    @property
    def ready_s(self) -> float:
        return max(self.theta[1], 1e-7)

    @property
    def load_s(self) -> float:
        """Seconds one load adds on its lane."""
        return max(self.theta[2], 0.0)

    @property
    def missing_s(self) -> float:
        """Seconds of one missing sub-expert on its own: its load and its compute."""
        return self.ready_s + self.load_s

    def waves(self, n_missing):
        """Loads one lane runs one after another for ``n_missing`` misses (int or int array)."""
        return -(-n_missing // self.lanes)

    def device_s(self, n_ready, n_missing):
        """Seconds of this layer's device FFN (without the fixed part): ints or int arrays."""
        return self.ready_s * (n_ready + n_missing) + self.load_s * self.waves(n_missing)

    def host_side_s(self, n_host: int) -> float:
        """Seconds of the host side: x's copy to the host, then each unit's read, convert, FFN."""
        if n_host <= 0:
            return 0.0
        if self.host_s is None:
            raise ValueError("no host path: host_s is None")
        return self.d2h_s + self.host_s * n_host

    def ffn_s(self, n_ready: int, n_missing: int, n_host: int = 0) -> float:
        """Seconds of this layer's FFN: max(device, host) + the result's copy back."""
        if n_host <= 0:
            return self.device_s(n_ready, n_missing)
        return max(self.device_s(n_ready, n_missing), self.host_side_s(n_host)) + self.h2d_s

    def predict(self, n_ready: float, n_missing: float, n_host: int = 0) -> float:
        """Seconds of a segment with these kept sub-experts."""
        return self.fixed_s + self.ffn_s(n_ready, n_missing, n_host)

    def prefix_costs(self, ready: np.ndarray, *, host: bool) -> tuple[np.ndarray, np.ndarray]:
        """FFN seconds [P] of each prefix of units in this order (``ready`` [P] bool: resident
        and landed), and how many of each prefix's missing units [P] go to the host: the
        number of the split max(device, host) + copy back is least for (the fewest on a tie).
        Without ``host`` (or a host path) none go. Non-decreasing in the prefix length."""
        P = ready.shape[0]
        n_ready = np.cumsum(ready)  # [P]
        n_missing = np.arange(1, P + 1) - n_ready  # [P]
        if not host or self.host_s is None or not n_missing[-1]:
            return self.device_s(n_ready, n_missing), np.zeros(P, dtype=np.int64)
        m = np.arange(int(n_missing[-1]) + 1)  # [M]: units sent to the host
        on_device = n_missing[:, None] - m[None, :]  # [P, M]
        dev = self.device_s(n_ready[:, None], np.maximum(on_device, 0))  # [P, M]
        side = np.where(m > 0, self.d2h_s + self.host_s * m, 0.0)  # [M]
        t = np.maximum(dev, side[None, :]) + np.where(m > 0, self.h2d_s, 0.0)[None, :]  # [P, M]
        t = np.where(on_device >= 0, t, np.inf)
        best = t.argmin(1)  # [P]
        return t[np.arange(P), best], best

    def observe(self, n_ready: int, n_missing: int, seconds: float, n_host: int = 0) -> None:
        """One measured segment.

        Without host units: exponentially weighted ridge regression of the device terms
        towards their start-up values.
        With them, t - fixed - h2d_s is max(device, host): clearly above the device
        prediction (by more than HOST_MARGIN of it, the fit's error on a device-bound
        segment), the host was the longer side and gives a sample of host_s; else the device
        was, its segment is learnt as one without the host part, and host_s is at most what
        that leaves it (an estimate above it comes down). A sample taken from a device-bound
        segment that the device fit slightly under-predicts would be far too large.
        """
        if n_host > 0 and self.host_s is not None:
            span = seconds - self.fixed_s - self.h2d_s  # max(device FFN, host side)
            per = max((span - self.d2h_s) / n_host, 1e-7)
            if span > (1 + self.HOST_MARGIN) * self.device_s(n_ready, n_missing):
                self.host_s += self.HOST_GAIN * (per - self.host_s)
                return
            if per < self.host_s:
                self.host_s += self.HOST_GAIN * (per - self.host_s)
            seconds -= self.h2d_s
        self._update(n_ready, n_missing, self.clipped(n_ready, n_missing, seconds), 1)

    def observe_many(self, n_ready: int, n_missing: int, seconds: float, count: int) -> None:
        """``count`` device-only segments of the same kept units, ``seconds`` in all (each
        already :meth:`clipped`): one update worth ``count`` of :meth:`observe`."""
        if count > 0:
            self._update(n_ready, n_missing, seconds, count)

    def _update(self, n_ready: int, n_missing: int, seconds: float, count: int) -> None:
        """The fit's update by ``count`` segments of these kept units taking ``seconds`` in all."""
        self._fit.update((1.0, float(n_ready + n_missing), float(self.waves(n_missing))), seconds, count)

    @property
    def theta(self) -> list[float]:
        """The fitted terms: fixed, per unit, per load wave (seconds)."""
        return self._fit.theta

    def clipped(self, n_ready: int, n_missing: int, seconds: float) -> float:
        """A segment's time as the fit takes it: a stall (another process, a page fault) counts
        as at most 3x the prediction, since the fit is a weighted mean and one 30 ms segment
        would move it for the next fifty."""
        return min(seconds, 3 * (self.fixed_s + self.device_s(n_ready, n_missing)))


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b for a 3x3 ``a`` (Cramer's rule; None if singular)."""
    def det(m):
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    d = det(a)
    if abs(d) < 1e-300:
        return None
    out = []
    for c in range(3):
        m = [[b[i] if j == c else a[i][j] for j in range(3)] for i in range(3)]
        out.append(det(m) / d)
    return out


# The share of decode tokens allowed to miss the budget: the planner aims at the budget less
# a slack that tracks this quantile of its own overruns.
MISS_RATE = 0.05
SLACK_STEP = 0.02  # of the budget, per missed token (a met token takes back MISS_RATE/(1-MISS_RATE) of it)
# A layer that starts later than the token's schedule by more than this share of the budget
# plans again (an earlier one takes the token's operating point as it is).
SCHEDULE_MARGIN = 0.02
FULL = 1 << 62  # the operating point "everything selected", whatever a layer's width
PLAN_GAIN = 0.2  # weight of one plan in the running average of a plan's own time
# Weight of one token in the running mean of the prediction's error. The per-layer terms
# are fitted from segments, and their sum missed whole tokens by 10-20% either way on the
# default model (the last layer's FFN and the head, which the segments do not see, and
# costs that are not quite linear in the units kept); the slack alone cannot correct a
# prediction that is too high, since it never goes below 0.
BIAS_GAIN = 0.2


class LatencyPlanner:
    """Trims each decode token's selection to fit ``budget_s`` (a model.Planner).

    A token runs at an operating point chosen for it: at each layer, the largest number of
    sub-experts that this layer and every later one can keep and still meet the deadline,
    taken in the order operating points take them (:meth:`order`: the routed experts' best
    parts by sub-expert gate score, shared among them as select.quotas shares a fixed K), so
    a trimmed layer keeps what the fixed K it trims to would keep. Its cost is OnlineCost's:
    max(device FFN, host side) + the host result's copy back, the device's missing loads
    queued on the transfer engine's lanes, the missing units split between device and host
    where that is least; the later layers' costs are their previous token's. A layer never
    keeps fewer than ``min_share`` of its selection (the floor: half of it by default, the
    lowest operating point the latency sweep compares with). Nothing is dropped while
    everything fits.

    The deadline planned for is the budget less the running mean of how far tokens overran
    their first plan's prediction (negative when they came in under it) and less a slack: a
    stochastic quantile tracker that
    grows on each token that missed and shrinks on each that met it, so that about MISS_RATE
    of tokens miss whatever the spread of the cost model's errors (without it the plans aim
    at the budget itself and half the tokens land above it). It starts at 0, so a budget
    that is never missed never drops anything.

    Per-layer bookkeeping is plain Python and numpy: torch's per-op dispatch on these
    [P]-sized vectors cost more than the sub-experts the plan saved on a small model.
    """

    trims = True  # model.Planner: plan() trims each layer's selection

    def __init__(self, model, store, cost: CostModel, *, budget_s: float, load_lanes: int | None = None,
                 min_share: float = 0.5):
        """``load_lanes``: how many missing sub-experts the store's transfer engine loads at
        once; None: what the store says (:func:`transfer_lanes`), else ``cost.workers``.
        ``min_share``: the share of a layer's selection it always keeps (at least one)."""
        if not 0.0 <= min_share <= 1.0:
            raise ConfigError(f"invalid min_share {min_share!r}: use a share between 0 and 1")
        self.model, self.store, self.cost, self.budget_s = model, store, cost, budget_s
        self.min_share = float(min_share)
        self.L = model.spec.num_layers
        if load_lanes is None:
            load_lanes = transfer_lanes(store) or cost.workers
        self.load_lanes = int(load_lanes)
        nbytes = max(store.block_nbytes(layer) for layer in range(self.L))
        self.fit = OnlineCost(cost.layer_fixed_s, cost.unit_s, cost.unit_s + cost.load_s(nbytes, 1),
                              lanes=self.load_lanes, host_s=cost.host_s, d2h_s=cost.d2h, h2d_s=cost.h2d_result)
        self.head_s = cost.head_s + cost.layer_fixed_s  # the last segment: FFN call overheads + head
        # Layers whose missing sub-experts may run on the host: a host path was measured and
        # the layer's blocks are float (quantized blocks stay bytes, and the host FFN is float).
        host = self.fit.host_s is not None and hasattr(store, "host_blocks")
        pool = getattr(store, "pool", None)
        self._host_ok = [host and (pool is None or pool(layer).dtype.is_floating_point) for layer in range(self.L)]
        self.slack_s = 0.0
        self._t0 = time.perf_counter()
        # (time of the last plan, ready kept, missing kept on the device, kept on the host)
        self._last: tuple[float, int, int, int] | None = None
        # per layer, from the previous token: its FFN time at each operating point (prefix) [P]
        self._seen: list[np.ndarray | None] = [None] * self.L
        # per layer: the sum of its later layers' _seen (padded) and how many had one
        self._later: list[tuple[np.ndarray | None, int]] = [(None, 0)] * self.L
        # this token's operating point (prefix length) and, per layer, the time since the
        # token's start by which it must begin to keep it without planning again
        self._level: int | None = None
        self._due: list[float] = [0.0] * self.L
        self.plan_s = 0.0  # seconds a plan takes (running average)
        self._last_quick = False  # the last segment began with an unplanned layer (_keep_level)
        self._pending: dict[tuple[int, int], tuple[float, int]] = {}  # such segments: (seconds, count)
        # The first plan's prediction of the token's time, and the running mean of how far
        # tokens overran it (negative: they took less), taken off the time left.
        self._predicted: float | None = None
        self.bias_s = 0.0
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the drop counters."""
        self.dropped = 0
        self.host_computed = 0
        self.tokens = 0

    def set_budget(self, budget_s: float) -> None:
        """Plan for ``budget_s`` per token from now on: the fitted costs stay, the slack (learnt
        against the old budget) and the drop counters start again."""
        self.budget_s, self.slack_s = budget_s, 0.0
        self.reset_stats()

    def start_token(self) -> None:
        """A decode token begins now: what every layer's later ones took at each operating
        point in the last token is summed once (one pass, not one per layer)."""
        self._t0 = time.perf_counter()
        self._last = None
        self._level = self._predicted = None
        self.tokens += 1
        seen = self._seen
        width = max((c.shape[0] for c in seen if c is not None), default=0)
        acc, count = None, 0
        for layer in range(self.L - 1, -1, -1):
            self._later[layer] = (acc, count)
            c = seen[layer]
            if c is not None:
                c = np.pad(c, (0, width - c.shape[0]), mode="edge") if c.shape[0] < width else c
                acc, count = (c if acc is None else acc + c), count + 1

    def end_token(self) -> None:
        """The token's logits are computed: the last segment (FFN of the last layer, head)
        is learnt, and the slack follows whether the token met the budget."""
        now = time.perf_counter()
        if self._last is not None:
            t, n_ready, n_missing, n_host = self._last
            rest = (now - t) - self.fit.ffn_s(n_ready, n_missing, n_host)
            self.head_s = 0.8 * self.head_s + 0.2 * max(rest, 0.0)
            self._last = None
        # The segments of layers that kept the token's operating point unplanned: one fit
        # update per kind of segment instead of one per layer (each cost ~20 us in Python).
        for (n_ready, n_missing), (total, count) in self._pending.items():
            self.fit.observe_many(n_ready, n_missing, total, count)
        self._pending.clear()
        if self._predicted is not None:
            error = now - self._t0 - self._predicted
            self.bias_s += BIAS_GAIN * (error - self.bias_s)
            self.bias_s = min(max(self.bias_s, -0.5 * self.budget_s), 0.5 * self.budget_s)
        step = SLACK_STEP * self.budget_s
        if now - self._t0 > self.budget_s:
            self.slack_s += step
        else:
            self.slack_s -= step * MISS_RATE / (1 - MISS_RATE)
        self.slack_s = min(max(self.slack_s, 0.0), 0.5 * self.budget_s)

    def order(self, layer: int, x: torch.Tensor, ids: np.ndarray, topi: torch.Tensor) -> np.ndarray:
        """Indices into ``ids`` [P] in the order operating points take them: operating point K
        keeps the first K. As select.quotas shares K among a token's routed experts (remainder
        to the higher ranks), the expert of rank j gets its r-th best part (by sub-expert gate
        score; without scores, by part number: hottest first) at place r * k + j."""
        S = self.model.parts[layer]
        P = ids.shape[0]
        part = ids % S
        experts = topi[0].cpu().numpy()  # [k], the routed experts in rank order
        k = experts.shape[0]
        rank = ((ids // S)[:, None] == experts[None, :]).argmax(1)  # [P]: the rank of each unit's expert
        scores = self.model.part_scores(layer, x, topi)  # [1, k, S] or None
        key = part if scores is None else -scores[0].float().cpu().numpy()[rank, part]
        if k == 1:
            return np.argsort(key, kind="stable")
        by_expert = np.lexsort((key, rank))  # [P]: expert by expert, best part first
        grouped = rank[by_expert]
        within = np.empty(P, dtype=np.int64)
        within[by_expert] = np.arange(P) - np.searchsorted(grouped, grouped)  # [P]: r
        return np.argsort(within * k + rank, kind="stable")

    def floor(self, P: int) -> int:
        """The fewest of ``P`` selected sub-experts a layer keeps, however late the token."""
        return min(P, max(1, math.ceil(self.min_share * P)))

    def operating_point(self, layer: int) -> None:
        """None: every layer selects at the model's operating point, and :meth:`plan` trims it."""
        return None

    def plan(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor,
             topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_plan`, timed: the segment the fit learns starts when the plan is made, and the
        plans' own time is a term of its own (``plan_s``, a running average) that every later
        layer is charged. Inside the segments it biased the fit: a full plan (the token's
        first layer, or one behind schedule) costs several times a kept one and is the layer
        most likely to keep extra sub-experts, so the per-unit time came out twice too high."""
        start = time.perf_counter()
        out = self._plan(layer, x, units, wt, topi, start)
        end = time.perf_counter()
        self.plan_s += PLAN_GAIN * ((end - start) - self.plan_s)
        if self._last is not None:
            self._last = (end, *self._last[1:])
        return out

    def _plan(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor,
              topi: torch.Tensor, now: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which of ``units`` to compute (on the device, then on the host CPU) to meet the deadline.

        Returns (device units, their weights, host units, their weights): missing sub-experts
        are computed on the host from host memory instead of waiting for their copies where
        that makes the layer shorter (CUDA): max(device FFN, x's copy to the host + their
        reads, conversions and host FFN) + the result's copy back, against the device FFN
        with their loads queued on the transfer lanes; the rest that do not fit are dropped.
        """
        fit = self.fit
        if self._last is not None:  # the segment since the last plan is measured: learn from it
            t, n_ready, n_missing, n_host = self._last
            if self._last_quick:  # one update a token for these (see end_token)
                key = (n_ready, n_missing)
                total, count = self._pending.get(key, (0.0, 0))
                self._pending[key] = (total + fit.clipped(n_ready, n_missing, now - t), count + 1)
            else:
                fit.observe(n_ready, n_missing, now - t, n_host)
        self._last_quick = False
        ids = units.numpy()
        P = ids.shape[0]
        if P == 0:
            self._last = (now, 0, 0, 0)
            return units, wt, units, wt
        if (layer > 0 and self._level is not None and not self._host_ok[layer]
                and (now - self._t0 <= self._due[layer] or min(self._level, P) <= self.floor(P))):
            # on schedule, or behind it at the floor already (planning again changes nothing)
            return self._keep_level(layer, x, ids, units, wt, topi, now)
        ready = np.fromiter((self.store.ready(layer, u) for u in ids.tolist()), dtype=bool, count=P)
        order = self.order(layer, x, ids, topi)  # [P]
        # The layer's FFN time at each operating point (prefix of ``order``) and how many of
        # the prefix's missing units the host takes.
        cost, n_host = fit.prefix_costs(ready[order], host=self._host_ok[layer])  # [P], [P]
        self._seen[layer] = cost
        left = (self.budget_s - self.slack_s - self.bias_s - (now - self._t0) - self.head_s
                - (self.L - 1 - layer) * (fit.fixed_s + self.plan_s) - self.plan_s)
        # What the layers still to come would take at each operating point: their costs of
        # the previous token, or this layer's where they have none yet.
        later, seen = self._later[layer]
        unseen = self.L - 1 - layer - seen
        # Operating points as prefix lengths, up to the widest selection among this layer and
        # the later ones (a layer with fewer units keeps all of its own beyond its length).
        width = max(P, 0 if later is None else later.shape[0])
        ks = np.arange(1, width + 1)

        def own_s(n):
            return cost[np.minimum(n, P) - 1]

        def later_s(n):
            own = unseen * own_s(n)
            return own if later is None else own + later[np.minimum(n, later.shape[0]) - 1]

        n_keep, n = P, FULL
        if own_s(width) + later_s(width) > left:
            # One operating point for this layer and every later one, the largest that fits
            # (never below the floor): the token runs as the best fixed K would, chosen anew
            # where the token falls behind. Time this layer can use beyond it while the later
            # layers keep that point goes to more of its own sub-experts.
            # Measured on the default model (scripts/latency_sweep.py): trimming each layer
            # to its share of the time left, most valuable sub-experts first and one kept at
            # the least, dropped the last layers of a late token to that one and cost 5-10x
            # the KL of the fixed operating point meeting the same budget.
            fits = np.flatnonzero(own_s(ks) + later_s(ks) <= left)
            n = max(int(fits[-1]) + 1 if fits.size else 0, self.floor(P))
            room = left - later_s(n)
            n_keep = min(max(min(n, P), int(np.searchsorted(cost, room, side="right"))), P)
        # The schedule the later layers keep this operating point on: they take it without
        # planning again (one plan a token, not thirty: per-layer planning in numpy cost
        # ~0.2 ms a layer on the default model) unless the token falls behind it.
        self._level = n
        rest = float(cost[n_keep - 1] + later_s(min(n, width))) + (self.L - 1 - layer) * (fit.fixed_s + self.plan_s)
        if self._predicted is None:  # the token's first plan: what it predicts the token takes
            self._predicted = now - self._t0 + self.plan_s + rest + self.head_s
        margin = SCHEDULE_MARGIN * self.budget_s
        for j in range(layer + 1, self.L):
            self._due[j] = now - self._t0 + (j - layer) / (self.L - layer) * rest + margin
        kept = order[:n_keep]
        n_hst = int(n_host[n_keep - 1])
        to_host = np.zeros(P, dtype=bool)
        if n_hst:  # the last kept of the missing units
            to_host[kept[~ready[kept]][-n_hst:]] = True
        keep = np.zeros(P, dtype=bool)
        keep[kept] = True
        on_device = keep & ~to_host
        self.dropped += P - n_keep
        self.host_computed += n_hst
        n_ready_kept = int(ready[kept].sum())
        self._last = (now, n_ready_kept, n_keep - n_hst - n_ready_kept, n_hst)
        none = units[:0]
        if n_keep == P and n_hst == 0:  # everything fits: no indexing
            return units, wt, none, wt[:0]
        dev = torch.from_numpy(np.flatnonzero(on_device))
        hst = torch.from_numpy(np.flatnonzero(to_host))
        return units[dev], wt[dev.to(wt.device)], units[hst], wt[hst.to(wt.device)]

    def _keep_level(self, layer: int, x: torch.Tensor, ids: np.ndarray, units: torch.Tensor,
                     wt: torch.Tensor, topi: torch.Tensor, now: float):
        """The token is on schedule: this layer keeps the token's operating point, unplanned
        (layers that may send misses to the host always plan: that split is per layer)."""
        P = ids.shape[0]
        n = max(min(self._level, P), self.floor(P))
        if n == P:
            kept_units, kept_wt = units, wt
        else:
            idx = self._best(layer, x, ids, topi, n)
            kept_units, kept_wt = units[idx], wt[idx.to(wt.device)]
        n_ready = sum(1 for u in kept_units.tolist() if self.store.ready(layer, u))
        self.dropped += P - n
        self._last, self._last_quick = (now, n_ready, n - n_ready, 0), True
        return kept_units, kept_wt, units[:0], wt[:0]

    def _best(self, layer: int, x: torch.Tensor, ids: np.ndarray, topi: torch.Tensor, n: int) -> torch.Tensor:
        """Indices (sorted, CPU) into ``ids`` of the first ``n`` in :meth:`order`. Every part of
        one routed expert (a dense model): the gate's top n by torch's own topk, as the fixed
        K's selector takes them, in three ops; numpy's ordering of a [P] score vector on
        every layer cost ~40 us a layer more on the default model."""
        S = self.model.parts[layer]
        if topi.shape[1] == 1 and ids.shape[0] == S:
            scores = self.model.part_scores(layer, x, topi)  # [1, 1, S] or None
            if scores is None:
                return torch.arange(n)  # hottest first
            return scores[0, 0].topk(n).indices.sort().values.cpu()
        return torch.from_numpy(np.sort(self.order(layer, x, ids, topi)[:n]))

    def report(self, latencies_s: list[float]) -> dict:
        """Drop counters, the share of decode tokens within the budget and the fitted costs."""
        within = sum(1 for t in latencies_s if t <= self.budget_s)
        return {
            "token_latency_budget_ms": self.budget_s * 1000,
            "dropped_subexperts": self.dropped,
            "dropped_subexperts_per_token": self.dropped / self.tokens if self.tokens else 0.0,
            "tokens_within_budget": within / len(latencies_s) if latencies_s else None,
            "cpu_computed_subexperts": self.host_computed,
            "cost_fixed_ms": self.fit.fixed_s * 1000,
            "plan_ms": self.plan_s * 1000,
            "cost_resident_ms": self.fit.ready_s * 1000,
            "cost_missing_ms": self.fit.missing_s * 1000,
            "cost_host_unit_ms": None if self.fit.host_s is None else self.fit.host_s * 1000,
            "load_lanes": self.load_lanes,
            "slack_ms": self.slack_s * 1000,
            "prediction_bias_ms": self.bias_s * 1000,
        }
