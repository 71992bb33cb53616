"""Export a prism checkpoint at one operating point as a standard Hugging Face MoE checkpoint.

prism checkpoint -> [target architecture of the family] -> per layer: sub-expert blocks
(_unit_matrices) -> experts of width n, W_down x fold -> router rows: parent row repeated
(+ eps x linear sub-expert gate below full K) -> safetensors shards + index, config.json,
generation_config.json, tokenizer -> temporary directory -> rename into place

A sub-expert is an expert of width n, so a refactored model at a fixed operating point K
is itself a standard MoE with E*S experts of width n and top-k = K, which stock engines
(transformers, vLLM) serve without custom code.

Target architecture per source family (each one's attention block is represented exactly):

- ``llama`` (dense: every FFN is one expert of S parts) -> ``mixtral``: Mixtral's attention
  is llama's (GQA, rotate-half RoPE with the same scaling types, no biases, RMSNorm), and
  its router (softmax over the experts, top-k, renormalised over the top-k) picks K of the
  FFN's S parts. Qwen-MoE targets would add q/k norms (qwen3_moe) or a shared expert and
  q/k/v biases (qwen2_moe) that a llama block does not have.
- ``mixtral`` -> ``mixtral``, ``qwen3_moe`` -> ``qwen3_moe`` (per-head q/k norm),
  ``qwen2_moe`` -> ``qwen2_moe`` (q/k/v biases, the sigmoid-gated shared expert, dense
  ``mlp_only_layers`` kept dense), ``olmoe`` -> ``olmoe`` (q/k norm over all heads,
  clip_qkv): each family keeps its own block, only the expert count, width and top-k change.

How the router reproduces edge-prism's selection (``select.py``):

- Full K (K = top_k * S): the parent's router row is repeated for its S sub-experts, so
  all S copies of an expert tie and the engine's top-(top_k*S) picks exactly every part of
  the top_k experts. Softmax over E*S equal copies gives each part p_e / S (or, for the
  families that renormalise over the top-k, norm_e / S): the factor S is folded into
  W_down, so the output equals the original model's up to float rounding. A dense llama
  FFN gets a zero router (each part 1/S) and S folded into W_down.
- Below full K, the sub-expert's linear gate ranks the parts of an expert: router row
  (e, s) = row_e + eps * (gate_{e,s} - mean over the expert's parts), centred so that the
  expert's total probability stays p_e, with eps per layer such that the gate moves the
  router logits by at most ``part_scale`` (default 1e-3: the routing weights stay within
  ~0.1% of equal across an expert's parts). Not expressible exactly, and measured at
  export time on held-out text (``edge_prism_export.json``, ``measured``):

  * the gate's bias: stock routers have none, and a linear router sees only the normed
    hidden state. The bias is folded in through a direction v fitted on calibration text
    (ridge least squares of x . v = 1), so gate(x) ~= x . (W + b v). Exact selection for
    a dense model otherwise; on the default model ~93% of tokens keep exactly the same
    12 of 16 parts and ~99% of the selected parts agree (figures in profiles/).
  * the spread of K over ranked experts (MoE sources): edge-prism gives each of the top_k
    experts an even share (quotas: K=12, top_k=2, S=8 -> 6+6); a top-K over E*S logits
    with a small eps fills the highest-ranked expert first (8+4). A dense model (top_k=1)
    is not affected. A larger eps, letting the gate mix experts' parts, agreed less with
    edge-prism on the tiny test models (selected-part overlap 0.83 at eps*spread 1e-3, 0.76
    at 0.3, 0.57 at 0.9), so eps stays small.
  * renormalisation (mixtral, qwen3_moe with norm_topk_prob): the engine renormalises
    over the K selected sub-experts, edge-prism over the top_k experts, a per-token factor
    sum(p) / sum(selected share * p); the export folds its least-squares average per layer
    (fitted on calibration text) into W_down instead of S.
  * 16-bit router logits of an MoE source: eps * gate (~1e-3) is below bfloat16's
    resolution of a router logit of ~1, so the part order within an expert becomes
    ties; export with ``--dtype float32`` to keep it (dense sources are not affected: their
    router logits are the small gate scores alone).

The exported directory is written atomically like every other writer: into a temporary
directory beside the target, then renamed into place; an existing output is replaced only
with ``force`` and only when it is an earlier export.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from edge_prism.errors import ConfigError, UnsupportedModelError
from edge_prism.families import FAMILIES
from edge_prism.spec import ModelSpec

log = logging.getLogger(__name__)

RECORD = "edge_prism_export.json"  # marks a directory as an export (safe to replace with force)
INDEX = "model.safetensors.index.json"
TARGETS = {"llama": "mixtral", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe",
           "qwen3_moe": "qwen3_moe", "olmoe": "olmoe"}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Source config keys a llama -> mixtral export keeps (everything that describes the
# attention block, the norms, the vocabulary and the special tokens).
_LLAMA_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
               "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id",
               "eos_token_id", "tie_word_embeddings", "attention_dropout")
_DROP_KEYS = ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
              "quantization_config", "architectures")


@dataclass(frozen=True)
class ExportConfig:
    """Knobs of one export."""

    operating_point: int | None = None  # K; None: full K (exact)
    dtype: str = "bfloat16"  # weights in the exported files
    calib_tokens: int = 4096  # text for fitting the gate-bias direction (below full K only)
    measure_tokens: int = 2048  # held-out text for the selection-agreement figures
    seq_len: int = 512  # window of the calibration/measurement forward passes
    part_scale: float = 1e-3  # largest logit change the gate makes within one expert's parts
    ridge: float = 1e-2  # relative ridge of the bias-direction fit
    max_shard_bytes: int = 2 * 1024 ** 3

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"invalid dtype '{self.dtype}': use one of {', '.join(DTYPES)}")
        if self.calib_tokens < 16 or self.measure_tokens < 16:
            raise ConfigError(f"invalid calibration/measurement tokens {self.calib_tokens}/"
                              f"{self.measure_tokens}: use at least 16")
        if not 0 < self.part_scale < 1:
            raise ConfigError(f"invalid part_scale {self.part_scale}: use a small positive value "
                              "such as 1e-3")
        if self.max_shard_bytes < 1:
            raise ConfigError(f"invalid shard size {self.max_shard_bytes}: use a positive size such as 2GiB")


@dataclass
class ExportReport:
    """What an export wrote and measured."""

    out: Path
    target: str
    operating_point: int
    full_operating_point: int
    num_experts: int  # per routed layer of the export (its top-k is the operating point)
    width: int  # neurons per exported expert
    seconds: float
    measured: dict = field(default_factory=dict)  # selection agreement below full K ({} when exact)

    @property
    def exact(self) -> bool:
        """Whether the export reproduces edge-prism (and the original model) exactly."""
        return self.operating_point == self.full_operating_point


@dataclass(frozen=True)
class _Plan:
    """The shape of one export, checked before any slow work."""

    source: str
    target: str
    k: int
    full: int
    parts: int  # S of the layers that become MoE layers
    width: int  # n, the exported experts' width
    moe_layers: tuple[int, ...]  # layers written as routed experts
    fold: float  # factor folded into the experts' W_down (exact at full K; a start below it)
    norm_topk: bool  # whether the target renormalises over the selected experts
    dense_model: bool  # a dense source: every FFN becomes an MoE layer of its parts


# -- public entry points ---------------------------------------------------------------------
def export(prism: str | Path | None, out: str | Path, cfg: ExportConfig = ExportConfig(), *,
           force: bool = False, progress: bool = False) -> ExportReport:
    """Write ``prism`` at ``cfg.operating_point`` as a Hugging Face MoE directory ``out``.

    ``prism``: a prism checkpoint directory, or None / 'default' for the default model's
    (built into the user cache on first use). Raises ConfigError for bad options or an
    existing ``out`` without ``force``, UnsupportedModelError when the target architecture
    cannot express the source.
    """
    from edge_prism.refactor.prism import open_prism
    from edge_prism.families import build_spec

    start = time.perf_counter()
    out = Path(out)
    _check_out(out, force=force)
    path = _resolve_prism(prism, progress=progress)
    pc = open_prism(path)
    spec = build_spec(pc.config, where=str(path / "prism.json"))
    plan = make_plan(spec, pc.parts, pc.config, cfg.operating_point)
    routers: dict[int, torch.Tensor] = {}  # below full K: layer -> rows [E*S, D]
    folds = {layer: plan.fold for layer in plan.moe_layers}
    measured: dict = {}
    if plan.k < plan.full:
        gate = pc.manifest.get("gates", {}).get("default", "linear")
        if gate != "linear":
            log.warning("%s: edge-prism's default gate is '%s'; a router can only hold the linear "
                        "gate, so the export selects parts with it", path, gate)
        if plan.norm_topk and not plan.dense_model:
            log.warning("below full K the %s router renormalises over the selected sub-experts, "
                        "edge-prism over the routed experts: the measured weight error says how much "
                        "this changes", plan.target)
        if not plan.dense_model and cfg.dtype != "float32":
            log.warning("%s router logits cannot resolve the part order within an expert "
                        "(eps x gate ~ %g of a logit); export with --dtype float32 to keep it",
                        cfg.dtype, cfg.part_scale)
        routers, folds, measured = _fit_routers(path, pc, spec, plan, cfg, progress=progress)
    _write(out, path, pc, spec, plan, cfg, routers, folds, measured, progress=progress)
    report = ExportReport(out=out, target=plan.target, operating_point=plan.k, full_operating_point=plan.full,
                          num_experts=_num_experts(spec, plan), width=plan.width,
                          seconds=time.perf_counter() - start, measured=measured)
    log.info("exported %s -> %s (%s, K=%d of %d) in %.1f s", path, out, plan.target, plan.k, plan.full,
             report.seconds)
    return report


def make_plan(spec: ModelSpec, parts: list[int], config: dict, k: int | None) -> _Plan:
    """The export's target and shapes; UnsupportedModelError names what cannot be expressed."""
    from edge_prism.select import check_operating_point, max_operating_point

    target = TARGETS.get(spec.family)
    if target is None:
        raise UnsupportedModelError(f"family '{spec.family}' has no export target; exportable: "
                                    f"{', '.join(sorted(TARGETS))}")
    _check_expressible(spec, config, target)
    full = max_operating_point(spec, parts)
    k = full if k is None else check_operating_point(k, spec, parts)
    dense_model = not spec.is_moe
    moe = tuple(i for i, f in enumerate(spec.ffn) if f.routed or dense_model)
    shapes = {(parts[i], spec.ffn[i].width // parts[i], spec.ffn[i].top_k) for i in moe}
    if len(shapes) != 1:
        raise UnsupportedModelError(
            f"layers split into different sub-expert counts or widths {sorted(shapes)}: a {target} "
            "config has one expert width and top-k; refactor with one --sub-experts value")
    S, n, _ = shapes.pop()
    norm = True if target == "mixtral" else bool(spec.ffn[moe[0]].norm_topk_prob)
    # Dense: the engine's weights are 1/K each (softmax of near-equal logits, renormalised by
    # Mixtral); MoE: each of an expert's S copies gets p_e / S.
    fold = float(k) if dense_model else float(S)
    return _Plan(source=spec.family, target=target, k=k, full=full, parts=S, width=n, moe_layers=moe,
                 fold=fold, norm_topk=norm, dense_model=dense_model)


def _check_expressible(spec: ModelSpec, config: dict, target: str) -> None:
    if spec.family == "llama":
        if spec.attention_bias:
            raise UnsupportedModelError("cannot export llama attention biases: Mixtral's attention "
                                        "has none (export needs a bias-free llama)")
        if config.get("mlp_bias"):
            raise UnsupportedModelError("cannot export llama mlp_bias: Mixtral's experts have no biases")
    if any(f.shared_width for f in spec.ffn) and target != "qwen2_moe":
        raise UnsupportedModelError(f"cannot export a shared expert to {target}")


def _resolve_prism(prism: str | Path | None, *, progress: bool) -> Path:
    from edge_prism.refactor.prism import is_prism

    if prism in (None, "default"):
        from edge_prism.api import default_prism

        return default_prism(progress=progress)
    path = Path(prism)
    if not is_prism(path):
        raise ConfigError(f"{path}: not a prism checkpoint; export takes the output of "
                          f"`edge-prism refactor MODEL --out {path}`")
    return path


def _num_experts(spec: ModelSpec, plan: _Plan) -> int:
    return spec.ffn[plan.moe_layers[0]].num_experts * plan.parts


# -- reading the prism checkpoint ------------------------------------------------------------
def _unit_matrices(pc, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's sub-experts in unit-id order (e*S+s), float32:
    W_gate rows [U, n, D], W_up rows [U, n, D], W_down columns [U, D, n].

    The only place this module reads sub-expert blocks; the checkpoint expands quantized
    blocks (PrismCheckpoint.unit_matrices), so an export of a quantized prism is its
    dequantization at the chosen --dtype.
    """
    return pc.unit_matrices(layer)


def _linear_gate(pc, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's linear sub-expert gate: weight [E, D, S], bias [E, S] (float32)."""
    return (pc.gate_tensor(f"layers.{layer}.linear.weight").float(),
            pc.gate_tensor(f"layers.{layer}.linear.bias").float())


# -- routers below full K ----------------------------------------------------------------------
class _FitObserver:
    """Calibration pass: per exported layer, sums for the bias direction (X^T X, X^T 1), the
    largest spread of the gate's scores over one expert's parts and, where the target
    renormalises over the selected sub-experts, sums for the least-squares W_down fold."""

    def __init__(self, model, pc, plan: _Plan, hidden: int, *, fit_fold: bool):
        self.model, self.plan, self.fit_fold = model, plan, fit_fold
        self.gates = {layer: _linear_gate(pc, layer) for layer in plan.moe_layers}
        names = FAMILIES[plan.source].names
        self.parents = {} if plan.dense_model else {
            layer: pc.dense_source.get(names.router.format(l=layer)).double() for layer in plan.moe_layers}
        self.gram = {layer: torch.zeros(hidden, hidden, dtype=torch.float64) for layer in plan.moe_layers}
        self.sums = {layer: torch.zeros(hidden, dtype=torch.float64) for layer in plan.moe_layers}
        self.spread = {layer: 0.0 for layer in plan.moe_layers}
        self.fold_xy = {layer: 0.0 for layer in plan.moe_layers}
        self.fold_xx = {layer: 0.0 for layer in plan.moe_layers}

    def __call__(self, layer: int, resid: torch.Tensor, x: torch.Tensor, topv: torch.Tensor,
                 topi: torch.Tensor) -> None:
        from edge_prism.refactor.gates import linear_scores_batched

        if layer not in self.gram:
            return
        xd = x.double()  # [T, D]
        self.gram[layer] += xd.t() @ xd  # [D, D]
        self.sums[layer] += xd.sum(dim=0)  # [D]
        w, b = self.gates[layer]
        scores = linear_scores_batched(w, b, x.float(), topi)  # [T, k, S]
        spread = (scores.amax(dim=-1) - scores.amin(dim=-1)).max()
        self.spread[layer] = max(self.spread[layer], float(spread))
        if self.fit_fold:
            self._fold_sums(layer, x, topv, topi)

    def _fold_sums(self, layer: int, x: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor) -> None:
        """Sums for f minimising |f * engine weight - edge-prism weight|^2 over the sub-experts
        both select; the engine's selection with an eps too small to reorder experts."""
        from edge_prism.refactor.gates import linear_scores_batched

        T, S = x.shape[0], self.plan.parts
        w, b = self.gates[layer]
        E = w.shape[0]
        every = torch.arange(E)[None, :].expand(T, E)  # [T, E]
        g = linear_scores_batched(w, b, x.float(), every).double()  # [T, E, S]
        g = g - g.mean(dim=-1, keepdim=True)
        tiny = 1e-6 / float(g.abs().max().clamp_min(1e-30))
        logits = (x.double() @ self.parents[layer].t())[:, :, None] + tiny * g  # [T, E, S]
        got = engine_weights(logits.reshape(T, E * S), self.plan.k, norm=True, fold=1.0)  # [T, U]
        want = _edge_prism_weights(self.model, layer, x, topv, topi, S, E * S)  # [T, U]
        both = (got != 0) & (want != 0)
        self.fold_xy[layer] += float((got * want)[both].sum())
        self.fold_xx[layer] += float((got * got)[both].sum())

    def fold(self, layer: int) -> float:
        """The fitted W_down factor of ``layer`` (the plan's when not fitted)."""
        if not self.fit_fold or self.fold_xx[layer] <= 0:
            return self.plan.fold
        return self.fold_xy[layer] / self.fold_xx[layer]


def _edge_prism_weights(model, layer: int, x: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor,
                        parts: int, units: int) -> torch.Tensor:
    """edge-prism's weight of every unit [T, U] at its operating point (0: not computed)."""
    T, k = topi.shape
    w = model.selector(layer, x, topv, topi).double()  # [T, k, S]
    ids = (topi[:, :, None] * parts + torch.arange(parts)).reshape(T, k * parts)  # [T, k*S]
    return torch.zeros(T, units, dtype=torch.float64).scatter_(1, ids, w.reshape(T, k * parts))  # [T, U]


def _bias_direction(gram: torch.Tensor, sums: torch.Tensor, ridge: float) -> torch.Tensor:
    """v [D] with x . v ~= 1 over the calibration inputs (ridge least squares, float64)."""
    D = gram.shape[0]
    penalty = ridge * float(gram.diagonal().mean()) + 1e-12
    return torch.linalg.solve(gram + penalty * torch.eye(D, dtype=gram.dtype), sums)


def router_rows(parent: torch.Tensor | None, gate_w: torch.Tensor, gate_b: torch.Tensor,
                direction: torch.Tensor, eps: float) -> torch.Tensor:
    """Router rows [E*S, D] of the exported sub-experts, in unit-id order.

    ``parent`` [E, D] is the source router (None for a dense FFN: one expert, logit 0),
    ``gate_w`` [E, D, S] and ``gate_b`` [E, S] the linear gate, ``direction`` [D] the
    fitted x . v ~= 1 that carries the gate's bias. Row (e, s) = parent_e + eps * (gate
    row of (e, s) minus the mean over e's parts): the centring leaves an expert's total
    probability at p_e, and the gate only orders its parts.
    """
    # E=experts, S=parts, D=hidden
    E, D, S = gate_w.shape
    g = gate_w.double().permute(0, 2, 1) + gate_b.double()[:, :, None] * direction.double()  # [E, S, D]
    g = g - g.mean(dim=1, keepdim=True)  # [E, S, D]
    base = torch.zeros(E, 1, D, dtype=torch.float64) if parent is None else parent.double()[:, None, :]
    return (base + eps * g).reshape(E * S, D).float()  # [E*S, D]


def engine_weights(logits: torch.Tensor, k: int, *, norm: bool, fold: float) -> torch.Tensor:
    """What a stock engine computes from router logits [T, U]: per-unit weights [T, U]
    (softmax over all units, top-k, renormalised over them when ``norm``), times ``fold``."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, U]
    topv, topi = torch.topk(probs, k, dim=-1)  # [T, K]
    if norm:
        topv = topv / topv.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, topi, topv * fold)  # [T, U]


class _AgreementObserver:
    """Measurement pass: per exported layer, edge-prism's selection and weights against the
    exported router's, on the same layer input."""

    def __init__(self, model, plan: _Plan, rows: dict[int, torch.Tensor], folds: dict[int, float],
                 dtype: torch.dtype):
        self.model, self.plan, self.folds, self.dtype = model, plan, folds, dtype
        self.rows = {layer: r.to(dtype) for layer, r in rows.items()}
        self.same = {layer: 0.0 for layer in rows}
        self.overlap = {layer: 0.0 for layer in rows}
        self.weight_error = {layer: 0.0 for layer in rows}
        self.tokens = {layer: 0 for layer in rows}

    def __call__(self, layer: int, resid: torch.Tensor, x: torch.Tensor, topv: torch.Tensor,
                 topi: torch.Tensor) -> None:
        if layer not in self.rows:
            return
        T = x.shape[0]
        U = self.rows[layer].shape[0]
        want = _edge_prism_weights(self.model, layer, x, topv, topi, self.plan.parts, U).float()  # [T, U]
        logits = (x.to(self.dtype) @ self.rows[layer].t()).float()  # [T, U]
        got = engine_weights(logits, self.plan.k, norm=self.plan.norm_topk, fold=self.folds[layer])  # [T, U]
        a, b = want != 0, got != 0
        self.same[layer] += float((a == b).all(dim=1).sum())
        self.overlap[layer] += float(((a & b).sum(dim=1) / a.sum(dim=1).clamp_min(1)).sum())
        err = (got - want).abs().sum(dim=1) / want.abs().sum(dim=1).clamp_min(1e-30)  # [T]
        self.weight_error[layer] += float(err.sum())
        self.tokens[layer] += T

    def summary(self) -> dict:
        """Per-layer and overall figures (fractions of tokens; mean relative L1 weight error)."""
        per = {name: {layer: getattr(self, name)[layer] / max(self.tokens[layer], 1) for layer in self.rows}
               for name in ("same", "overlap", "weight_error")}
        out = {
            "same_selection": _mean(per["same"]), "worst_layer_same_selection": min(per["same"].values()),
            "selected_overlap": _mean(per["overlap"]), "weight_error": _mean(per["weight_error"]),
            "per_layer": {str(layer): {name: per[name][layer] for name in per} for layer in self.rows},
        }
        return out


def _mean(d: dict) -> float:
    return sum(d.values()) / max(len(d), 1)


def _forward_text(engine, split: str, tokens: int, seq_len: int, *, progress: bool, desc: str) -> int:
    """Run ``tokens`` of the stdlib docstrings' ``split`` through ``engine`` in windows."""
    from edge_prism.refactor.corpus import stdlib_text

    ids = torch.tensor(engine.tokenizer.encode(stdlib_text(split), add_bos=False)[:tokens])
    windows = [w for w in ids.split(min(seq_len, engine.max_context)) if w.numel() > 1]
    for w in tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False):
        engine.logits(w)
    engine.reset()
    return ids.numel()


def _fit_routers(path: Path, pc, spec: ModelSpec, plan: _Plan, cfg: ExportConfig, *,
                 progress: bool) -> tuple[dict[int, torch.Tensor], dict[int, float], dict]:
    """Router rows and W_down folds of every exported layer below full K, and their
    measured agreement with edge-prism."""
    from edge_prism.api import RuntimeConfig, load_with

    engine = load_with(path, RuntimeConfig(device="cpu", dtype="float32", operating_point=plan.k))
    model = engine.model
    fit = _FitObserver(model, pc, plan, spec.hidden_size, fit_fold=plan.norm_topk and not plan.dense_model)
    with model.observing(fit):
        calib = _forward_text(engine, "calib", cfg.calib_tokens, cfg.seq_len, progress=progress,
                              desc="export: calibration")
    rows, eps, folds = {}, {}, {}
    for layer in plan.moe_layers:
        w, b = fit.gates[layer]
        v = _bias_direction(fit.gram[layer], fit.sums[layer], cfg.ridge)  # [D]
        eps[layer] = cfg.part_scale / fit.spread[layer] if fit.spread[layer] > 0 else cfg.part_scale
        rows[layer] = router_rows(fit.parents.get(layer), w, b, v, eps[layer])  # [E*S, D]
        folds[layer] = fit.fold(layer)
    agree = _AgreementObserver(model, plan, rows, folds, DTYPES[cfg.dtype])
    with model.observing(agree):
        held_out = _forward_text(engine, "eval", cfg.measure_tokens, cfg.seq_len, progress=progress,
                                 desc="export: measuring")
    measured = agree.summary()
    measured.update(calibration_tokens=calib, held_out_tokens=held_out, router_dtype=cfg.dtype,
                    eps={str(layer): e for layer, e in eps.items()},
                    text="python-stdlib-docstrings: calib split (fit), eval split (measured)")
    log.info("export selection on held-out text: %.1f%% of tokens keep edge-prism's exact set "
             "(worst layer %.1f%%), %.2f%% of selected sub-experts agree, weight error %.2f%%",
             100 * measured["same_selection"], 100 * measured["worst_layer_same_selection"],
             100 * measured["selected_overlap"], 100 * measured["weight_error"])
    return rows, folds, measured


# -- writing -----------------------------------------------------------------------------------
def _tensors(pc, spec: ModelSpec, plan: _Plan, routers: dict[int, torch.Tensor], folds: dict[int, float]
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the export, HF names, float32, layer by layer (one layer in memory)."""
    src, dst = FAMILIES[spec.family].names, FAMILIES[plan.target].names
    per_layer: dict[int, list[str]] = {}
    top, bottom = [], []
    source_routers = {src.router.format(l=i) for i in range(spec.num_layers)} if src.router else set()
    for name in sorted(pc.dense_source.names()):
        if name in source_routers:
            continue
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            per_layer.setdefault(int(parts[2]), []).append(name)
        elif name == "model.embed_tokens.weight":
            top.append(name)
        else:
            bottom.append(name)
    for name in top:
        yield name, pc.dense_source.get(name)
    moe = set(plan.moe_layers)
    for layer in range(spec.num_layers):
        for name in per_layer.get(layer, []):
            yield name, pc.dense_source.get(name)
        if layer in moe:
            yield from _moe_layer(pc, spec, plan, layer, routers.get(layer), folds[layer], src, dst)
        else:
            yield from _dense_layer(pc, layer, dst)
    for name in bottom:
        yield name, pc.dense_source.get(name)


def _moe_layer(pc, spec: ModelSpec, plan: _Plan, layer: int, rows: torch.Tensor | None, fold: float,
               src, dst) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer's sub-experts as experts of width n (W_down x ``fold``), and its router [E*S, D]."""
    wg, wu, wd = _unit_matrices(pc, layer)  # [U, n, D], [U, n, D], [U, D, n]
    U = wg.shape[0]
    if rows is None:  # full K: the parent's row for each of its parts (a dense FFN: zeros)
        if plan.dense_model:
            rows = torch.zeros(U, spec.hidden_size)  # [S, D]
        else:
            parent = pc.dense_source.get(src.router.format(l=layer)).float()  # [E, D]
            rows = parent.repeat_interleave(plan.parts, dim=0)  # [E*S, D]
    g, u, d = dst.expert
    for unit in range(U):
        yield g.format(l=layer, e=unit), wg[unit]
        yield u.format(l=layer, e=unit), wu[unit]
        yield d.format(l=layer, e=unit), wd[unit] * fold
    yield dst.router.format(l=layer), rows


def _dense_layer(pc, layer: int, dst) -> Iterator[tuple[str, torch.Tensor]]:
    """A dense FFN of an MoE model, its parts concatenated (neuron order does not matter)."""
    wg, wu, wd = _unit_matrices(pc, layer)  # [S, n, D], [S, n, D], [S, D, n]
    S, n, D = wg.shape
    g, u, d = dst.dense
    yield g.format(l=layer), wg.reshape(S * n, D)
    yield u.format(l=layer), wu.reshape(S * n, D)
    yield d.format(l=layer), wd.permute(1, 0, 2).reshape(D, S * n)


class _ShardWriter:
    """Safetensors shards of at most ``max_bytes`` (one tensor may exceed it), plus the index."""

    def __init__(self, directory: Path, max_bytes: int, dtype: torch.dtype):
        self.dir, self.max_bytes, self.dtype = directory, max_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor, converted to the export dtype (a copy: no shared storage)."""
        t = tensor.to(self.dtype, copy=True).contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.dir / f".shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, name the shards model-XXXXX-of-YYYYY, write the index."""
        if self.pending:
            self._flush()
        count = len(self.shards)
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.dir / f".shard-{i}", self.dir / fname)
            files.append(fname)
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


def target_config(spec: ModelSpec, source: dict, plan: _Plan, num_experts: int, dtype: str) -> dict:
    """config.json of the export: the source's own config (same family) or a Mixtral config
    carrying the llama block, with the experts' count, width and top-k of the operating point."""
    if plan.target == spec.family:
        cfg = {k: v for k, v in source.items() if k not in _DROP_KEYS}
    else:
        cfg = {k: source[k] for k in _LLAMA_KEYS if k in source}
        cfg.update(_rope_keys(spec))
        cfg.update(sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
                   head_dim=spec.head_dim, num_key_value_heads=spec.num_kv_heads,
                   tie_word_embeddings=spec.tie_word_embeddings, rms_norm_eps=spec.rms_norm_eps)
    # Both spellings of the expert count: transformers 5 maps one onto the other per family,
    # older readers (vLLM's pinned transformers) read the family's own.
    cfg.update(model_type=plan.target, architectures=[ARCHITECTURES[plan.target]],
               num_experts_per_tok=plan.k, num_experts=num_experts, num_local_experts=num_experts,
               torch_dtype=dtype)
    if plan.target == "mixtral":
        cfg.update(intermediate_size=plan.width)
    elif plan.target == "olmoe":
        cfg.update(intermediate_size=plan.width, norm_topk_prob=plan.norm_topk)
    else:  # qwen2_moe, qwen3_moe: intermediate_size stays the dense layers' width
        cfg.update(moe_intermediate_size=plan.width, norm_topk_prob=plan.norm_topk)
    return dict(sorted(cfg.items()))


def _rope_keys(spec: ModelSpec) -> dict:
    """RoPE in both spellings: rope_theta/rope_scaling (transformers 4, vLLM) and rope_parameters (5)."""
    scaling = {k: (int(v) if isinstance(v, float) and v.is_integer() and k.startswith("original") else v)
               for k, v in spec.rope_scaling}
    params = {"rope_type": scaling.get("rope_type", "default"), "rope_theta": spec.rope_theta,
              **{k: v for k, v in scaling.items() if k != "rope_type"}}
    return {"rope_theta": spec.rope_theta, "rope_scaling": scaling or None, "rope_parameters": params}


def _generation_config(spec: ModelSpec, pc) -> dict:
    from edge_prism.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(pc.path)
    eos = set(spec.eos_token_ids) | (set(tok.stop_ids) if tok is not None else set())
    cfg: dict = {"eos_token_id": sorted(eos)}
    if spec.bos_token_id is not None:
        cfg["bos_token_id"] = spec.bos_token_id
    if pc.config.get("pad_token_id") is not None:
        cfg["pad_token_id"] = pc.config["pad_token_id"]
    return cfg


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """tokenizer.json and tokenizer_config.json as they are; the chat template also as
    chat_template.jinja (what transformers 5 writes)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    config = src / "tokenizer_config.json"
    if config.is_file() and not (dst / "chat_template.jinja").exists():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            (dst / "chat_template.jinja").write_text(template, encoding="utf-8")


def _write(out: Path, path: Path, pc, spec: ModelSpec, plan: _Plan, cfg: ExportConfig,
           routers: dict[int, torch.Tensor], folds: dict[int, float], measured: dict, *,
           progress: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        writer = _ShardWriter(tmp, cfg.max_shard_bytes, DTYPES[cfg.dtype])
        tensors = _tensors(pc, spec, plan, routers, folds)
        for name, tensor in tqdm(tensors, desc="export: tensors", unit="t", disable=not progress, leave=False):
            writer.add(name, tensor)
        files = writer.finish()
        num_experts = _num_experts(spec, plan)
        _write_json(tmp / "config.json", target_config(spec, pc.config, plan, num_experts, cfg.dtype))
        _write_json(tmp / "generation_config.json", _generation_config(spec, pc))
        _copy_tokenizer(path, tmp)
        _write_json(tmp / RECORD, _record(path, pc, plan, cfg, num_experts, files, folds, measured))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _record(path: Path, pc, plan: _Plan, cfg: ExportConfig, num_experts: int, files: list[str],
            folds: dict[int, float], measured: dict) -> dict:
    from edge_prism import __version__

    exact = plan.k == plan.full
    return {
        "format": "edge-prism-export", "version": 1, "edge_prism_version": __version__,
        "source": {"prism": str(path.resolve()), "family": plan.source,
                   "model": pc.manifest.get("source", {}).get("path")},
        "target": plan.target, "operating_point": plan.k, "full_operating_point": plan.full,
        "sub_experts": plan.parts, "num_experts": num_experts, "expert_width": plan.width,
        "w_down_fold": {str(layer): f for layer, f in folds.items()}, "dtype": cfg.dtype, "files": files,
        "selection": ("exact: every part of the top-k experts (router rows repeated, fold in W_down)" if exact
                      else "router rows + eps x centred linear gate (bias through a fitted direction)"),
        "measured": measured,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _check_out(out: Path, *, force: bool) -> None:
    """Refuse an existing output without ``force``, and anything but an earlier export with it."""
    if not out.exists():
        return
    if not force:
        raise ConfigError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    if not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory; choose another --out")
    if any(out.iterdir()) and not (out / RECORD).exists():
        raise ConfigError(f"{out}: exists and is not an edge-prism export; refusing to replace it, "
                          "choose another --out")


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- command line ------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """Export a prism checkpoint as a Hugging Face MoE directory."""
    import sys

    from edge_prism.runtime.sizes import parse_size

    cfg = ExportConfig(operating_point=args.operating_point, dtype=args.dtype,
                       calib_tokens=args.calib_tokens,
                       max_shard_bytes=parse_size(args.max_shard_size, what="--max-shard-size"))
    report = export(args.model, args.out, cfg, force=args.force, progress=True)
    how = "exact" if report.exact else (
        f"{100 * report.measured['same_selection']:.1f}% of held-out tokens keep edge-prism's "
        f"selection, {100 * report.measured['selected_overlap']:.2f}% of sub-experts agree")
    print(f"wrote {report.out} in {report.seconds:.1f} s: {report.target}, {report.num_experts} experts "
          f"of width {report.width}, top-k {report.operating_point} (K={report.operating_point} of "
          f"{report.full_operating_point}; {how}); serve it with: vllm serve {report.out}", file=sys.stderr)
    return 0


def add_export_parser(subparsers) -> Callable[[argparse.Namespace], int]:
    """Add the ``export`` subcommand to ``subparsers``; returns its handler."""
    p = subparsers.add_parser(
        "export", help="write a prism checkpoint at one operating point as a Hugging Face MoE model",
        description="Write a prism checkpoint at operating point K as a standard Hugging Face MoE "
                    "directory (Mixtral for llama sources, the source's own architecture for MoE "
                    "families) that transformers and vLLM load unmodified: every sub-expert becomes "
                    "an expert, top-k = K. Full K is exact; below it, see edge_prism_export.json.")
    p.add_argument("model", nargs="?", default="default", metavar="PRISM",
                   help="prism checkpoint directory, or 'default' (the default model's)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("-k", "--operating-point", type=int, default=None,
                   help="active sub-experts per token per layer (default: full, exact)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="weight dtype of the files")
    p.add_argument("--calib-tokens", type=int, default=4096,
                   help="calibration tokens for the router below full K")
    p.add_argument("--max-shard-size", default="2GiB", help="largest safetensors shard")
    p.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    return cmd_export


__all__ = ["ExportConfig", "ExportReport", "export", "make_plan", "router_rows", "engine_weights",
           "target_config", "add_export_parser", "cmd_export"]
