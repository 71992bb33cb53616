"""Offline refactoring: experts -> sub-experts, without retraining.

calibration text (the model's own replies to fixed prompts + stdlib docstrings, or --calib-file)
-> [model with FFN observer] -> per expert: routed inputs x (capped, reservoir-sampled) -> act = silu(x W_gate) * (x W_up) -> [partition solver] -> neuron
permutation, parts ordered hottest first -> [gates: proxy + linear] -> prism checkpoint
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edge_prism.build import (TensorReader, expected_shapes, expert_matrices, expert_names_shapes,
                              expert_qmatrices, pack_expert)
from edge_prism.families import FAMILIES
from edge_prism.quant import (DEFAULT_GROUP, GROUP_SIZES, QUANT_KINDS, Int4Backend, QMatrix, UnitFormat, kind_of,
                              planes_of, relative_error)
from edge_prism.errors import ConfigError, TokenizerError
from edge_prism.families import build_spec
from edge_prism.prefetch.predictor import RegressionStats, fit_correction
from edge_prism.loaders import open_checkpoint, resolve_model
from edge_prism.refactor import gates as gatelib
from edge_prism.refactor.corpus import stdlib_text
from edge_prism.refactor.selfgen import GenerationRecipe, generated_text
from edge_prism.refactor.partition import (DEFAULT_SUB_EXPERTS_RULE, SOLVERS, default_sub_experts, group_size_ok,
                                           partition, partition_objective,
                                           permutation_from_groups)
from edge_prism.refactor.stream import calibrate_layers, read_source
from edge_prism.refactor.prism import (StreamedSafetensors, qmatrix_tensors, streamed_experts_path, check_out_dir, estimate_prism_bytes, file_stats, hash_files, is_prism,
                                         output_lock, write_prism)
from edge_prism.spec import ModelSpec

log = logging.getLogger(__name__)

# Measured on the default model (held-out stdlib docstrings, K=12 of 16): linear x1.35 of
# full perplexity, proxy x1.79 (oracle x1.25); the lower one is the default.
DEFAULT_GATE = "linear"

PERMUTED_DOWN = ("int8", "source", "whole-groups")
PERMUTED_DOWN_HELP = (
    "a quantized source's W_down, whose groups (g neurons sharing a scale) run along the neurons "
    "the partition moves: int8 (the default): each sub-expert's W_down is quantized again at int8, "
    "near the source's values (a 4-bit source's FFN grows by 1/3); source: again at the source's "
    "precision (smallest; on the default model +9-10%% perplexity at full K); whole-groups: the "
    "partition moves whole groups, so W_down is the source's as stored (exact at full K, but a "
    "coarser partition: 1.5-2x the perplexity of int8 at K=12 on the default model)")

QUANT_HELP = (
    "auto (the default): a quantized source (GGUF) keeps its precision class per matrix (Q4 types "
    "int4, Q5/Q6/Q8 int8; W_gate/W_up rows move whole, exactly; W_down's groups are rebuilt per "
    "sub-expert), a float source becomes int4 in groups of --group-size (embeddings and lm_head "
    "int8); none: float blocks and weights (exact, 4-8x the bytes); int8 / int4: that precision "
    "for every expert and attention weight")


MASS_KINDS = ("activation", "output")


@dataclass(frozen=True)
class RefactorConfig:
    """Knobs of one refactoring run."""

    sub_experts: int | None = None  # None: partition.default_sub_experts (24 or 16 per dense FFN, 8 per routed expert)
    calib_files: tuple[Path, ...] = ()  # empty: generated text + the stdlib's docstrings (calib split)
    calib_tokens: int = 8192
    # Without calib_files, this share of calib_tokens is text the model writes itself from fixed
    # seed prompts (refactor.selfgen), the rest stdlib docstrings; 0: docstrings only.
    generated_share: float = 0.5
    solver: str = "anneal"
    seed: int = 0
    rows_per_expert: int = 4096
    gate_neurons: int = 4
    gate_ridge: float = 1e-3  # linear gate's ridge penalty, relative to the mean input variance
    gate_target: str = "log"  # what the linear gate predicts: "mass" or "log" mass (gates.fit_linear_gate)
    # What a neuron's share of a token is measured in, for the partition, the gates and the hottest-first
    # order: "activation" |act_i| (MoE-Prism), or "output" |act_i| * ||W_down[:, i]|| (its output's size).
    mass: str = "output"
    seq_len: int = 512
    keep_fraction: float = 0.75  # the operating point the solver tunes for: keep 3N/4 parts
    default_gate: str = DEFAULT_GATE
    quant: str = "auto"  # auto | none | int8 | int4, see QUANT_HELP
    group_size: int = DEFAULT_GROUP  # values per (scale, zero) when quantizing float weights
    # A quantized source's W_down (see PERMUTED_DOWN_HELP): "int8" (neurons move one by one,
    # each sub-expert's W_down quantized again at int8), "source" (again, at the source's own
    # precision) or "whole-groups" (the solver moves whole W_down groups: exact, coarser).
    permuted_down: str = "int8"
    # Measure each layer's loss at each operating point on the calibration text and store it
    # (refactor.sensitivity), so an operating point's sub-experts go where they are worth most.
    layer_sensitivity: bool = True

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"invalid solver '{self.solver}': use one of {', '.join(SOLVERS)}")
        if self.calib_tokens < 16:
            raise ConfigError(f"invalid calib_tokens {self.calib_tokens}: use at least 16")
        if not 0.0 <= self.generated_share <= 1.0:
            raise ConfigError(f"invalid generated_share {self.generated_share}: use a fraction in [0, 1]")
        if self.sub_experts is not None and self.sub_experts < 1:
            raise ConfigError(f"invalid sub_experts {self.sub_experts}: use 1 or more")
        if self.mass not in MASS_KINDS:
            raise ConfigError(f"invalid mass '{self.mass}': use one of {', '.join(MASS_KINDS)}")
        if self.gate_target not in gatelib.GATE_TARGETS:
            raise ConfigError(f"invalid gate target '{self.gate_target}': use one of "
                              f"{', '.join(gatelib.GATE_TARGETS)}")
        if self.default_gate not in gatelib.GATE_KINDS:
            raise ConfigError(f"invalid gate '{self.default_gate}': use one of {', '.join(gatelib.GATE_KINDS)}")
        if self.quant not in ("auto",) + QUANT_KINDS:
            raise ConfigError(f"invalid --quant '{self.quant}': use auto, {', '.join(QUANT_KINDS)}")
        if self.permuted_down not in PERMUTED_DOWN:
            raise ConfigError(f"invalid permuted_down '{self.permuted_down}': use one of {', '.join(PERMUTED_DOWN)}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"invalid --group-size {self.group_size}: use one of "
                              f"{', '.join(map(str, GROUP_SIZES))}")


@dataclass
class RefactorReport:
    """What a refactoring run measured."""

    out: Path
    seconds: float
    calib_tokens: int
    objective: dict[str, float] = field(default_factory=dict)  # solver -> summed objective / tokens


def parts_for(spec: ModelSpec, requested: int | None) -> list[int]:
    """Sub-experts per expert for every layer, checked against each layer's width."""
    out = []
    for layer, f in enumerate(spec.ffn):
        n = requested or default_sub_experts(f.width, f.routed)
        if not group_size_ok(f.width, n):
            raise ConfigError(f"invalid --sub-experts {n}: layer {layer}'s experts have {f.width} "
                              f"neurons, which do not split into {n} equal groups; choose a divisor "
                              f"of {f.width}")
        out.append(n)
    return out


def calibration_ids(tokenizer, cfg: RefactorConfig, generated: str = "") -> torch.Tensor:
    """Calibration token ids [T]: the given files, else ``generated`` text (the model's own,
    at most ``generated_share`` of the budget) followed by the standard library's docstrings."""
    if cfg.calib_files:
        texts = []
        for f in cfg.calib_files:
            try:
                texts.append(Path(f).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{f}: cannot read calibration text ({e}); give a UTF-8 text file") from None
        ids = tokenizer.encode("\n\n".join(texts), add_bos=False)[: cfg.calib_tokens]
    else:
        ids = tokenizer.encode(generated, add_bos=False)[: generated_tokens(cfg)] if generated else []
        ids += tokenizer.encode(stdlib_text("calib"), add_bos=False)[: cfg.calib_tokens - len(ids)]
    if len(ids) < 16:
        raise ConfigError(f"calibration text has only {len(ids)} tokens; give more text (--calib-file)")
    return torch.tensor(ids)


def generated_tokens(cfg: RefactorConfig) -> int:
    """Tokens of self-generated calibration text in a run of ``cfg`` (0 with --calib-file)."""
    return 0 if cfg.calib_files else int(cfg.calib_tokens * cfg.generated_share)


def generation_recipe(cfg: RefactorConfig) -> GenerationRecipe:
    """How a run of ``cfg`` generates its calibration text."""
    return GenerationRecipe(tokens=generated_tokens(cfg), seed=cfg.seed)


class _Collector:
    """FFN observer: per (layer, expert) a seeded reservoir of routed inputs, and counts."""

    def __init__(self, spec: ModelSpec, cap: int, seed: int):
        self.spec, self.cap = spec, cap
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: dict[tuple[int, int], torch.Tensor] = {}
        self.seen: dict[tuple[int, int], int] = {}
        self.counts = [torch.zeros(f.num_experts, dtype=torch.int64) for f in spec.ffn]
        self.tokens = 0
        # Predictor corrections: residual after layer l's attention -> after layer l+d's.
        self.drift = {(l, d): RegressionStats(spec.hidden_size) for l in range(spec.num_layers)
                      for d in (1, 2) if l + d < spec.num_layers}
        self._resid: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, resid: torch.Tensor, x: torch.Tensor, topv: torch.Tensor,
                 topi: torch.Tensor) -> None:
        if layer == 0:
            self.tokens += x.shape[0]
            self._resid = {}
        self._resid[layer] = resid.float()
        self._resid.pop(layer - 3, None)  # drift pairs reach two layers back
        for d in (1, 2):
            if layer - d in self._resid:
                self.drift[(layer - d, d)].add(self._resid[layer - d], self._resid[layer])
        self.counts[layer] += torch.bincount(topi.reshape(-1), minlength=self.spec.ffn[layer].num_experts)
        for e in topi.unique().tolist():
            xe = x[(topi == e).any(dim=1)].float()  # [R, D]
            self._add((layer, e), xe)

    def _add(self, key: tuple[int, int], xe: torch.Tensor) -> None:
        seen = self.seen.get(key, 0)
        buf = self.rows.get(key)
        need = min(self.cap, seen + xe.shape[0])
        if buf is None or buf.shape[0] < need:
            # Grown to what is kept (doubling, at most cap rows): an expert that sees a few
            # tokens holds a few rows, not cap x hidden floats.
            grown = torch.empty(min(self.cap, max(need, 2 * (0 if buf is None else buf.shape[0]), 64)), xe.shape[1])
            if buf is not None:
                grown[:min(seen, self.cap)] = buf[:min(seen, self.cap)]
            buf = self.rows[key] = grown
        take = min(self.cap - seen, xe.shape[0]) if seen < self.cap else 0
        buf[seen:seen + take] = xe[:take]
        # Reservoir sampling for the rest: row i (0-based overall) replaces a random slot
        # with probability cap / (i + 1), so every routed token is equally likely kept.
        rest = xe[take:]
        if rest.shape[0]:
            idx = torch.arange(seen + take, seen + xe.shape[0])  # overall positions
            pick = (torch.rand(rest.shape[0], generator=self.gen) * (idx + 1)).long()
            keep = (pick < self.cap).nonzero().squeeze(1)  # [K] rows that replace a slot
            # Two rows of one batch may pick the same slot: as in the one-at-a-time algorithm,
            # the later one wins. (An index_put_ with repeated indices keeps an arbitrary one,
            # which made refactoring nondeterministic.)
            last = torch.full((self.cap,), -1).scatter_reduce_(0, pick[keep], keep, reduce="amax")
            slots = (last >= 0).nonzero().squeeze(1)  # [K'] distinct slots
            buf[slots] = rest[last[slots]]
        self.seen[key] = seen + xe.shape[0]

    def release(self, layer: int) -> None:
        """Forget ``layer``'s samples once it is partitioned."""
        for key in [k for k in self.rows if k[0] == layer]:
            del self.rows[key]

    def inputs(self, layer: int, expert: int) -> torch.Tensor:
        """The kept inputs of one expert [R, D] (R <= cap)."""
        key = (layer, expert)
        if key not in self.rows:
            return torch.empty(0, self.spec.hidden_size)
        return self.rows[key][: min(self.seen[key], self.cap)]


def refactor(model: str | Path | None, out: Path, cfg: RefactorConfig = RefactorConfig(), *,
             force: bool = False, progress: bool = True) -> RefactorReport:
    """Refactor ``model`` into a prism checkpoint at ``out``.

    Holds the writer lock of ``out`` from the first check to the rename: a second writer of
    the same output fails fast (OutputBusyError) instead of both writing.
    """
    out = Path(out)
    path = resolve_model(model)
    with output_lock(out):
        check_out_dir(out, force=force, need_bytes=estimate_prism_bytes(path))
        return _refactor(path, out, cfg, force=force, progress=progress)


def phase(name: str) -> None:
    """Log the start of a phase of the run (``-v``): scripts/refactor_memory.py --trace reads these
    lines to split its memory samples by phase."""
    log.info("phase: %s", name)


def _refactor(path: Path, out: Path, cfg: RefactorConfig, *, force: bool, progress: bool) -> RefactorReport:
    start = time.perf_counter()
    phase("open")
    if is_prism(path):
        raise ConfigError(f"{path}: already a prism checkpoint; refactor its source model instead")
    raw = open_checkpoint(path)
    if raw.tokenizer is None:
        raise TokenizerError(f"{path}: no tokenizer, so calibration text cannot be tokenized; "
                             "add tokenizer.json to the model directory")
    where = str(path / "config.json" if path.is_dir() else path)
    spec = build_spec(raw.config, where=where)
    parts = parts_for(spec, cfg.sub_experts)
    cpu = torch.device("cpu")
    # Tensors read into private buffers, not viewed on the mapping: what the run holds is what
    # it uses (a mapping's touched pages would stay resident, every byte of the model).
    source = read_source(raw.tensors)
    reader = TensorReader(source, path, dtype=torch.float32, device=cpu)
    # The same tensors in their stored bits, where the source is quantized (GGUF).
    qreader = TensorReader(source, path, dtype=torch.float32, device=cpu, backend=Int4Backend(cpu))
    formats = [_unit_format(spec, qreader, layer, parts[layer], cfg) for layer in range(spec.num_layers)]
    files = [Path(f).resolve() for f in raw.files]
    source_sha = hash_files(files)
    recipe = generation_recipe(cfg)
    phase("generation")
    generated = generated_text(path, source_sha, recipe, progress=progress)
    ids = calibration_ids(raw.tokenizer, cfg, generated)
    chunks = list(ids.split(min(cfg.seq_len, spec.max_position)))
    store_dtype = raw.tensors.get(next(iter(expert_names_shapes(spec, 0)))).dtype
    phase("calibration 0")
    collector = _Collector(spec, cfg.rows_per_expert, cfg.seed)
    objective = {s: 0.0 for s in ("contiguous", cfg.solver)}
    errors: dict[str, list[float]] = {"gate_up": [], "down": []}
    # Layer by layer: calibrate it (its weights read from the source files), partition it,
    # append its blocks to experts.safetensors and its gates to gates.safetensors, forget it.
    # Peak memory stays near one layer's experts whatever the model's size (the gates alone
    # are ~72 MiB a layer at the Qwen3-30B-A3B shape: 3.4 GiB for 48 layers).
    writer = StreamedSafetensors(streamed_experts_path(out), _expert_entries(spec, parts, formats, store_dtype))
    gate_writer = StreamedSafetensors(streamed_experts_path(out, "gates"), _gate_entries(spec, parts, cfg))
    threads = torch.get_num_threads()
    bar = tqdm(total=spec.num_layers, desc=f"calibrating and partitioning ({cfg.solver})", unit="layer",
               disable=not progress)
    try:
        for layer in calibrate_layers(spec, source, reader, chunks, collector):
            phase(f"partition {layer}")
            # The solver's per-swap tensor ops are too small to split: extra threads only contend.
            torch.set_num_threads(1)
            try:
                blocks, order, layer_gates, obj = _refactor_layer(spec, reader, qreader, collector, layer,
                                                                  parts[layer], cfg, formats[layer], errors,
                                                                  store_dtype=store_dtype)
            finally:
                torch.set_num_threads(threads)
            writer.write(f"layers.{layer}.blocks", blocks, rows=order)  # hottest first, no reordered copy
            writer.write(f"layers.{layer}.order", order)
            del blocks
            for k in _LAYER_GATES:
                gate_writer.write(f"layers.{layer}.{k}", layer_gates[k])
            del layer_gates
            for k, v in obj.items():
                objective[k] += v
            collector.release(layer)
            bar.update()
            if layer + 1 < spec.num_layers:
                phase(f"calibration {layer + 1}")
        for (layer, d), stats in sorted(collector.drift.items()):
            scale, bias = fit_correction(stats)
            gate_writer.write(f"layers.{layer}.predict.{d}.scale", scale)
            gate_writer.write(f"layers.{layer}.predict.{d}.bias", bias)
        gates = gate_writer.close()
        experts = writer.close()
    except BaseException:
        writer.abort()
        gate_writer.abort()
        raise
    finally:
        bar.close()
    objective = {k: v / max(collector.tokens, 1) for k, v in objective.items()}

    phase("dense")
    dense_names = set(expected_shapes(spec)) - {n for layer in range(spec.num_layers)
                                                 for n in expert_names_shapes(spec, layer)}
    dense = _dense_tensors(spec, raw, source, qreader, sorted(dense_names), cfg, store_dtype,
                           quantized=any(formats) or cfg.quant in ("int4", "int8"), errors=errors)
    manifest = {
        "source": {"path": str(path.resolve()), "files": [str(f) for f in files],
                   "sha256": source_sha, "stats": file_stats(files)},
        "family": spec.family,
        "config": raw.config,
        "sub_experts": parts,
        "default_operating_point": None,  # None: full K
        "gates": {"default": cfg.default_gate, "kinds": list(gatelib.GATE_KINDS),
                  "neurons_per_group": cfg.gate_neurons},
        "calibration": {"source": [str(f) for f in cfg.calib_files] or _default_sources(recipe),
                        "tokens": collector.tokens, "rows_per_expert": cfg.rows_per_expert,
                        "seed": cfg.seed,
                        "generated": ({"recipe": dataclasses.asdict(recipe),
                                       "sha256": hashlib.sha256(generated.encode()).hexdigest()}
                                      if generated else None)},
        "solver": {"name": cfg.solver, "keep_fraction": cfg.keep_fraction,
                   "objective_per_token": objective},
        "tokenizer": _tokenizer_files(path),
        "refactor_config": config_record(cfg),
        "quant": {"mode": cfg.quant, "layers": [f.record() if f else None for f in formats],
                  "relative_error": {k: (sum(v) / len(v) if v else 0.0) for k, v in errors.items()},
                  "source_conversions": {k: list(v) for k, v in
                                         sorted(getattr(raw.tensors, "conversions", {}).items())}},
    }
    phase("writing")
    try:
        finish = None
        if cfg.layer_sensitivity and any(parts[j] > 1 for j in range(spec.num_layers)):
            def finish(tmp: Path) -> dict:
                phase("layer sensitivity")
                return {"layer_sensitivity": _layer_sensitivity(tmp, ids, progress=progress)}
        write_prism(out, manifest=manifest, dense=dense, experts=experts, gates=gates, force=force,
                    extra=raw.tokenizer.save, finish=finish)
    finally:
        experts.unlink(missing_ok=True)  # moved into the checkpoint, or left by a failure
        gates.unlink(missing_ok=True)
    return RefactorReport(out=out, seconds=time.perf_counter() - start, calib_tokens=collector.tokens,
                          objective=objective)


def _layer_sensitivity(tmp: Path, ids: torch.Tensor, *, progress: bool) -> dict:
    """The layer_sensitivity record of the checkpoint just written to ``tmp`` (see
    refactor.sensitivity), on the calibration ids."""
    from edge_prism.api import RuntimeConfig, load_with
    from edge_prism.refactor import sensitivity

    engine = load_with(tmp, RuntimeConfig(device="cpu", dtype="float32", layer_allocation=False))
    try:
        return sensitivity.measure(engine.model, ids, progress=progress)
    finally:
        engine.close()


def _expert_entries(spec: ModelSpec, parts: list[int], formats: list, store_dtype: torch.dtype) -> list:
    """(name, dtype, shape) of every tensor of experts.safetensors, in the order they are written."""
    out = []
    for layer, (f, S, fmt) in enumerate(zip(spec.ffn, parts, formats)):
        U = f.num_experts * S
        if fmt is None:
            out.append((f"layers.{layer}.blocks", store_dtype, (U, 3, f.width // S, spec.hidden_size)))
        else:
            out.append((f"layers.{layer}.blocks", torch.uint8, (U, fmt.nbytes)))
        out.append((f"layers.{layer}.order", torch.int64, (U,)))
    return out


_LAYER_GATES = ("perm", "frequency", "proxy.rows", "linear.weight", "linear.bias", "compensation")


def _gate_entries(spec: ModelSpec, parts: list[int], cfg: RefactorConfig) -> list:
    """(name, dtype, shape) of every tensor of gates.safetensors, in the order they are written:
    per layer its _LAYER_GATES (as _refactor_layer makes them), then the predictor's corrections."""
    out, D = [], spec.hidden_size
    for layer, (f, S) in enumerate(zip(spec.ffn, parts)):
        E, name = f.num_experts, f"layers.{layer}."
        out += [(name + "perm", torch.int64, (E, f.width)), (name + "frequency", torch.float32, (E * S,)),
                (name + "proxy.rows", torch.float32, (E, S, cfg.gate_neurons, 2, D)),
                (name + "linear.weight", torch.float32, (E, D, S)), (name + "linear.bias", torch.float32, (E, S)),
                (name + "compensation", torch.float32, (E * S, D))]
    L = spec.num_layers
    for layer, d in sorted((layer, d) for layer in range(L) for d in (1, 2) if layer + d < L):
        out += [(f"layers.{layer}.predict.{d}.{k}", torch.float32, (D,)) for k in ("scale", "bias")]
    return out


def _default_sources(recipe: GenerationRecipe) -> list[str]:
    return ([f"self-generated:{recipe.prompts}"] if recipe.tokens else []) + ["python-stdlib-docstrings:calib"]


def _unit_format(spec: ModelSpec, qreader: TensorReader, layer: int, parts: int,
                 cfg: RefactorConfig) -> UnitFormat | None:
    """How ``layer``'s sub-expert blocks are stored (None: float), per --quant (QUANT_HELP)."""
    if cfg.quant == "none":
        return None
    f = spec.ffn[layer]
    n, D = f.width // parts, spec.hidden_size
    source = expert_qmatrices(spec, qreader, layer, 0)
    if cfg.quant == "auto" and source is not None:
        gate, up, down = source
        # W_down is quantized again unless its groups stay whole: at int8 by default.
        dn_planes = max(down.planes, 2) if cfg.permuted_down == "int8" else down.planes
        fmt = UnitFormat(n, D, max(gate.planes, up.planes), dn_planes, gate.group)
    else:
        kind = "int4" if cfg.quant == "auto" else cfg.quant
        group = cfg.group_size if source is None else source[0].group
        fmt = UnitFormat(n, D, planes_of(kind), planes_of(kind), group)
    if n % fmt.group or D % fmt.group:
        if cfg.quant == "auto":
            log.warning("layer %d: sub-experts of %d neurons (hidden %d) do not split into quantization "
                        "groups of %d; its blocks stay float", layer, n, D, fmt.group)
            return None
        raise ConfigError(f"--quant {cfg.quant}: layer {layer}'s sub-experts have {n} neurons and hidden size "
                          f"{D}, not multiples of the quantization group {fmt.group}; use --quant none, a "
                          "smaller --group-size, or fewer --sub-experts")
    return fmt


def quantized_parts(wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor, parts: int, perm: torch.Tensor,
                    fmt: UnitFormat, source: tuple[QMatrix, QMatrix, QMatrix] | None,
                    errors: dict[str, list[float]]) -> torch.Tensor:
    """One expert's quantized sub-expert blocks [S, nbytes].

    W_gate / W_up: a part's rows are whole rows of the source, and their groups run along
    the hidden dimension, so a quantized source's rows are taken as they are (exact). W_down:
    its groups run along the neurons, so where a part's neurons are whole source groups (the
    partition kept them whole, RefactorConfig.permuted_down) its columns are those groups as
    stored (exact); otherwise they are scattered over the source's groups and the part's
    [D, n] matrix is quantized again in groups of its own neurons. Either way the error
    against the source's values is recorded.
    """
    n = wg.shape[0] // parts
    out = torch.empty(parts, fmt.nbytes, dtype=torch.uint8)
    gu_kind, dn_kind = kind_of(fmt.gu_planes), kind_of(fmt.dn_planes)
    reuse = source is not None and all(q.group == fmt.group and q.planes <= fmt.gu_planes for q in source[:2])
    for s in range(parts):
        idx = perm[s * n:(s + 1) * n]
        if reuse:
            gu = QMatrix.cat_rows([source[0].take_rows(idx), source[1].take_rows(idx)]).with_planes(fmt.gu_planes)
        else:
            gu = QMatrix.quantize(torch.cat((wg[idx], wu[idx])), gu_kind, fmt.group)
            errors["gate_up"].append(relative_error(gu.dequantize(), torch.cat((wg[idx], wu[idx]))))
        down = wd_t[idx].t()  # [D, n]
        groups = whole_groups_of(idx, source[2].group) if source is not None else None
        if groups is not None and source[2].group == fmt.group and source[2].planes <= fmt.dn_planes:
            dn = source[2].take_col_groups(groups).with_planes(fmt.dn_planes)
        else:
            dn = QMatrix.quantize(down, dn_kind, fmt.group)
        errors["down"].append(relative_error(dn.dequantize(), down))
        out[s] = fmt.pack_block(gu, dn)
    return out


def whole_groups_of(idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """The source groups (of ``group`` consecutive neurons) that neurons ``idx`` are, in order,
    when they are whole groups each in ascending order; else None."""
    if idx.numel() % group:
        return None
    blocks = idx.view(-1, group)
    first = blocks[:, 0]
    if bool((first % group).any()) or not torch.equal(blocks, first[:, None] + torch.arange(group)):
        return None
    return first // group


def atom_size(spec: ModelSpec, qreader: TensorReader, layer: int, parts: int, cfg: RefactorConfig,
              fmt: UnitFormat | None) -> int:
    """Neurons the partition moves together in ``layer``: the source's W_down group where
    RefactorConfig.permuted_down keeps it whole (a quantized source whose groups tile every
    sub-expert), else 1."""
    if fmt is None or cfg.permuted_down != "whole-groups":
        return 1
    source = expert_qmatrices(spec, qreader, layer, 0)
    if source is None:
        return 1
    g = source[2].group
    width = spec.ffn[layer].width
    return g if width % (g * parts) == 0 and g == fmt.group else 1


def _dense_tensors(spec: ModelSpec, raw, source, qreader: TensorReader, names: list[str], cfg: RefactorConfig,
                   store_dtype: torch.dtype, *, quantized: bool, errors: dict[str, list[float]]) -> dict:
    """The always-resident tensors to store: quantized ones keep their bits (or, from a float
    source with --quant int4/int8/auto, every projection is quantized: attention and shared
    experts at the chosen kind, embeddings and lm_head at int8), the rest as floats."""
    shapes = expected_shapes(spec)
    fam = FAMILIES[spec.family].names
    keep_float = {fam.router.format(l=layer) for layer in range(spec.num_layers)}
    if fam.shared_gate:
        keep_float |= {fam.shared_gate.format(l=layer) for layer in range(spec.num_layers)}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        shape = shapes[name]
        q = qreader.quantized(name, shape) if quantized and name not in keep_float else None
        if q is None and quantized and cfg.quant != "none" and len(shape) == 2 and name not in keep_float:
            kind = "int4" if cfg.quant == "auto" else cfg.quant
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                kind = "int8"
            if shape[1] % cfg.group_size == 0 and not hasattr(raw.tensors, "quantized"):
                # 2048-row chunks: the error measurement's float64 temporaries of 8192 rows of a
                # vocabulary-sized matrix were +0.84 GiB over the matrix itself (+0.37 at 2048;
                # OLMoE's lm_head); the codes and the error come out the same.
                q, err = QMatrix.quantize_measured(source.get(name), kind, cfg.group_size, chunk_rows=2048)
                errors.setdefault("dense", []).append(err)
        if q is not None:
            out.update(qmatrix_tensors(name, q))
        else:
            out[name] = source.get(name).to(store_dtype)
    return out


def config_record(cfg: RefactorConfig) -> dict:
    """The knobs of a run as JSON (a cached checkpoint is rebuilt when its defaults change)."""
    rec = dict(vars(cfg))
    rec["calib_files"] = [str(f) for f in cfg.calib_files]
    rec["default_sub_experts"] = DEFAULT_SUB_EXPERTS_RULE  # what sub_experts=None meant
    return rec


def _tokenizer_files(path: Path) -> str:
    return "gguf" if path.suffix == ".gguf" else "hf"


def _refactor_layer(spec: ModelSpec, reader: TensorReader, qreader: TensorReader, col: _Collector, layer: int,
                    parts: int, cfg: RefactorConfig, fmt: UnitFormat | None, errors: dict[str, list[float]], *,
                    store_dtype: torch.dtype = torch.float32):
    """One layer's blocks in expert order (float ones in ``store_dtype``: one layer's experts as
    stored, not a float32 copy), their storage order (hottest first), gates and objective."""
    f = spec.ffn[layer]
    n, D = f.width // parts, spec.hidden_size
    keep = max(1, math.ceil(cfg.keep_fraction * parts))
    atom = atom_size(spec, qreader, layer, parts, cfg, fmt)
    blocks = (torch.empty(f.num_experts * parts, 3, n, D, dtype=store_dtype) if fmt is None
              else torch.empty(f.num_experts * parts, fmt.nbytes, dtype=torch.uint8))
    freq = torch.zeros(f.num_experts * parts)
    perms = torch.empty(f.num_experts, f.width, dtype=torch.int64)
    proxy_rows = []
    lin_w, lin_b = [], []
    comp = torch.zeros(f.num_experts * parts, D)  # [E*S, D] by unit id (expert * S + part)
    obj = {"contiguous": 0.0, cfg.solver: 0.0}
    total = max(col.tokens, 1)
    for e in range(f.num_experts):
        wg, wu, wd = expert_matrices(spec, reader, layer, e)  # [W, D] each
        x = col.inputs(layer, e)  # [R, D]
        seed = cfg.seed * 1_000_003 + layer * 1009 + e
        if x.shape[0] == 0:
            # Never routed on calibration text: keep the checkpoint order, no statistics.
            groups = torch.arange(f.width) // n
            acts = signed = torch.zeros(1, f.width)
            x = torch.zeros(1, D)
        else:
            acts = signed = F.silu(x @ wg.t()) * (x @ wu.t())  # [R, W]
            if cfg.mass == "output":
                acts = signed * wd.norm(dim=1)  # [R, W]: each neuron's output is act_i * W_down[:, i]
            if atom == 1:
                groups = partition(acts, parts, keep=keep, solver=cfg.solver, seed=seed)
            else:  # whole source groups of W_down: partition their summed masses, then expand
                mass_of = acts.abs().view(acts.shape[0], -1, atom).sum(-1)  # [R, W/atom]
                groups = partition(mass_of, parts, keep=keep, solver=cfg.solver, seed=seed).repeat_interleave(atom)
            a = acts.abs()
            obj[cfg.solver] += partition_objective(a, groups, parts, keep=keep)
            obj["contiguous"] += partition_objective(a, torch.arange(f.width) // n, parts, keep=keep)
        # Parts hottest first: order groups by their mean activation mass.
        mass = torch.zeros(acts.shape[0], parts).index_add_(1, groups, acts.abs())  # [R, N]
        order = torch.argsort(mass.mean(0), descending=True, stable=True)  # [N]
        perm = permutation_from_groups(groups, order)  # [W]
        relabel = torch.empty_like(order)
        relabel[order] = torch.arange(parts)
        groups = relabel[groups]  # part ids, 0 = hottest
        perms[e] = perm
        if fmt is None:
            blocks[e * parts:(e + 1) * parts] = pack_expert(wg, wu, wd, parts, perm)
        else:
            source = expert_qmatrices(spec, qreader, layer, e)
            blocks[e * parts:(e + 1) * parts] = quantized_parts(wg, wu, wd, parts, perm, fmt, source, errors)
        # The proxy gate computes its neurons' activations at run time: in "output" mass, their
        # up rows carry the W_down norm, so that it scores in the same unit as it was fitted.
        wu_mass = wu * wd.norm(dim=1, keepdim=True) if cfg.mass == "output" else wu
        proxy = gatelib.fit_proxy_gate(acts, wg, wu_mass, groups, parts, neurons_per_group=cfg.gate_neurons)
        linear = gatelib.fit_linear_gate(x, acts, groups, parts, ridge=cfg.gate_ridge, target=cfg.gate_target)
        proxy_rows.append(proxy.rows)
        lin_w.append(linear.weight)
        lin_b.append(linear.bias)
        # Selection frequency at the tuned operating point: routed share x share of the
        # expert's tokens whose default-gate top-`keep` parts include this part.
        gate = proxy if cfg.default_gate == "proxy" else linear
        scores = gatelib.gate_scores(gate, x)  # [R, N]
        chosen = torch.zeros(parts).index_add_(
            0, scores.topk(keep, dim=1).indices.reshape(-1), torch.ones(scores.shape[0] * keep))
        routed = float(col.counts[layer][e]) / total
        freq[e * parts:(e + 1) * parts] = routed * chosen / max(scores.shape[0], 1)
        comp[e * parts:(e + 1) * parts] = gatelib.compensation(signed, wd, groups, parts, scores, keep)
    unit_order = torch.argsort(-freq, stable=True)  # storage order: hottest first
    layer_gates = {
        "perm": perms,
        "frequency": freq,
        "proxy.rows": torch.stack(proxy_rows).to(torch.float32),
        "linear.weight": torch.stack(lin_w).to(torch.float32),
        "linear.bias": torch.stack(lin_b).to(torch.float32),
        "compensation": comp,
    }
    return blocks, unit_order, layer_gates, obj
