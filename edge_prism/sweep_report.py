"""The sweep's rows, reported: a fixed-width table with ratios, a CSV and a PNG plot.

rows -> format_table (ratios against sub-expert LRU) | write_csv / read_csv | plot (PNG)

matplotlib is imported by :func:`plot` only, so reading or printing rows never loads it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Sequence

from edge_prism.sweep_config import ALL, COLUMNS, REFERENCE, SYSTEMS, SweepRow


def _cell(v, width: int, spec: str, scale: float = 1.0) -> str:
    return f"{'-' if v is None else format(v * scale, spec):>{width}}"


def _reference(rows: Sequence[SweepRow]) -> dict:
    return {(r.memory_budget, r.operating_point): r for r in rows if r.system == REFERENCE}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_table(rows: Sequence[SweepRow]) -> str:
    """The rows as a fixed-width table, with tokens/s and bytes ratios against sub-expert LRU."""
    if not rows:
        return "(no rows)"
    ref = _reference(rows)
    syn = any(r.synthetic for r in rows)
    name_w = max(len(r.system) for r in rows) + (12 if syn else 0)
    head = (f"{'system':{name_w}} {'budget':>7} {'K':>4} {'tok/s':>8} {'ttft s':>7} {'hit %':>6} "
            f"{'MiB/tok':>8} {'p50 ms':>7} {'p99 ms':>7} {'ppl':>7} {'x tok/s':>8} {'x bytes':>8}")
    label = " [SYNTHETIC random weights: speed and traffic only]" if syn else ""
    lines = [f"memory-budget sweep: {rows[0].model} on {rows[0].device}{label}", head, "-" * len(head)]
    for r in rows:
        base = ref.get((r.memory_budget, r.operating_point))
        x_tps = _ratio(r.tokens_per_s, base.tokens_per_s) if base else None
        x_bytes = _ratio(r.bytes_per_token, base.bytes_per_token) if base else None
        name = r.system + (" (synthetic)" if r.synthetic else "")
        lines.append(
            f"{name:{name_w}} {r.memory_budget:>7} {r.operating_point:>4} {_cell(r.tokens_per_s, 8, '.2f')} "
            f"{_cell(r.ttft_s, 7, '.3f')} {_cell(r.hit_rate, 6, '.1f', 100)} "
            f"{_cell(r.bytes_per_token, 8, '.3f', 1 / 2**20)} {_cell(r.p50_ms, 7, '.1f')} "
            f"{_cell(r.p99_ms, 7, '.1f')} {_cell(r.perplexity, 7, '.2f')} {_cell(x_tps, 8, '.2f')} "
            f"{_cell(x_bytes, 8, '.2f')}")
    lat = [r for r in rows if r.latency_budget_ms is not None]
    if lat:
        lines += ["", f"{'token-latency budget':{name_w}} {'budget':>7} {'K':>4} {'limit ms':>8} "
                      f"{'within %':>8} {'drop/tok':>8} {'KL':>8} {'same %':>7}"]
        for r in lat:
            lines.append(f"{r.system:{name_w}} {r.memory_budget:>7} {r.operating_point:>4} "
                         f"{_cell(r.latency_budget_ms, 8, '.1f')} {_cell(r.within_budget, 8, '.1f', 100)} "
                         f"{_cell(r.dropped_per_token, 8, '.1f')} {_cell(r.kl_vs_full, 8, '.4f')} "
                         f"{_cell(r.same_tokens, 7, '.1f', 100)}")
    notes = sorted({f"{r.system}: {r.note}" for r in rows if r.note})
    lines += ["", f"x tok/s, x bytes: ratio to {REFERENCE} at the same budget and K",
              *[f"note: {n}" for n in notes]]
    return "\n".join(lines)


def write_csv(rows: Sequence[SweepRow], path: str | Path) -> None:
    """Write the rows to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow(r.as_dict())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_csv(path: str | Path) -> list[SweepRow]:
    """Rows written by :func:`write_csv`."""
    types = {f.name: f.type for f in dataclasses.fields(SweepRow)}
    out = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            kw = {}
            for name, text in raw.items():
                t = str(types[name])
                if text == "":
                    kw[name] = None if "None" in t else ("" if t == "str" else 0)
                elif t.startswith("float"):
                    kw[name] = float(text)
                elif t.startswith("int"):
                    kw[name] = int(text)
                elif t == "bool":
                    kw[name] = text == "True"
                else:
                    kw[name] = text
            out.append(SweepRow(**kw))
    return out


_COLORS = {"edge-prism": "tab:blue", "edge-prism+prefetch": "tab:cyan", "subexpert-lru": "tab:orange",
           "expert-lru": "tab:red", "all-resident": "tab:green", "transformers+accelerate": "tab:purple",
           "bound": "black"}


def plot(rows: Sequence[SweepRow], path: str | Path) -> None:
    """A PNG: tokens/s, MiB moved per token and hit rate against the memory budget, one line
    per system and operating point; all-resident and the bound only where they mean something."""
    import matplotlib  # benchmark-only: loaded when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(r.memory_budget for r in rows if r.memory_budget not in (ALL, "-")))
    points = sorted({r.operating_point for r in rows}, reverse=True)
    styles = dict(zip(points, ["-", "--", ":", "-."] * 4))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    panels = [("tokens_per_s", "decode tokens/s", 1.0),
              ("bytes_per_token", "MiB moved to the device per token", 1 / 2**20),
              ("hit_rate", "hit rate (%)", 100.0)]
    for i, (ax, (field, label, scale)) in enumerate(zip(axes, panels)):
        for system in SYSTEMS:
            if i and system in ("all-resident", "bound"):
                continue  # their traffic is nil or edge-prism's: only their speed says something
            for k in points:
                sel = [r for r in rows if r.system == system and r.operating_point == k
                       and getattr(r, field) is not None]
                if not sel:
                    continue
                name = system + (f" K={k}" if len(points) > 1 else "")
                if system == "bound":
                    name += " (upper bound)"
                color = _COLORS.get(system)
                if system == "all-resident":
                    ax.axhline(getattr(sel[0], field) * scale, color=color, ls=styles[k], lw=1.2, label=name)
                    continue
                sel = [r for r in sel if r.memory_budget in budgets]
                xs = [budgets.index(r.memory_budget) for r in sel]
                ys = [getattr(r, field) * scale for r in sel]
                ax.plot(xs, ys, color=color, ls=styles[k], marker="x" if system == "bound" else "o",
                        lw=1.8 if system.startswith("edge-prism") else 1.1, label=name)
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_xlabel("memory budget (resident sub-expert bytes)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    r0 = rows[0]
    syn = "  [SYNTHETIC random weights: speed and traffic only]" if r0.synthetic else ""
    fig.suptitle(f"memory-budget sweep: {r0.model} on {r0.device}{syn}", fontsize=12)
    fig.tight_layout(rect=(0, 0.05 * (1 + (len(labels) - 1) // 6), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


__all__ = ["format_table", "write_csv", "read_csv", "plot"]
