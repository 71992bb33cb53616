"""Offline refactoring: prism checkpoints of every family are exact at full K, deterministic,
written atomically, and refused clearly when damaged or stale (synthetic tiny weights)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import edge_prism
from edge_prism.cli import main
from edge_prism.errors import ConfigError, PrismCheckpointError
from edge_prism.refactor.refactor import RefactorConfig, refactor

FAMILIES = ["llama", "qwen2_moe", "qwen2_moe-mlp_only_layers", "qwen3_moe", "mixtral", "olmoe"]
FAST = RefactorConfig(calib_tokens=384, rows_per_expert=256, seq_len=128)
PROMPT = list(range(40, 64))  # 24 byte tokens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_operating_point_reproduces_the_original(family, prism_of, tiny_engines):
    plain = tiny_engines(family).logits(PROMPT)
    prism = edge_prism.load(prism_of(family))
    assert rel_err(prism.logits(PROMPT), plain) < 1e-4
    assert prism.generate_ids(PROMPT, max_new_tokens=8) == tiny_engines(family).generate_ids(PROMPT, max_new_tokens=8)


@pytest.mark.parametrize("solver", ["anneal", "greedy", "contiguous", "random"])
def test_every_solver_is_exact_at_full_k(solver, prism_of, tiny_engines):
    plain = tiny_engines("qwen3_moe").logits(PROMPT)
    assert rel_err(edge_prism.load(prism_of("qwen3_moe", solver)).logits(PROMPT), plain) < 1e-4


@pytest.mark.parametrize("family", ["llama", "olmoe"])
@pytest.mark.parametrize("gate", ["proxy", "linear"])
def test_lower_operating_points_run_and_change_the_output(family, gate, prism_of, tiny_engines):
    full = tiny_engines(family).logits(PROMPT)
    engine = edge_prism.load(prism_of(family), operating_point=3, gate=gate)
    low = engine.logits(PROMPT)
    assert low.shape == full.shape and torch.isfinite(low).all()
    assert rel_err(low, full) > 1e-4  # fewer sub-experts really compute less
    assert engine.model.operating_point == 3


def test_operating_point_out_of_range_is_refused(prism_of):
    path = prism_of("olmoe")  # 8 sub-experts x top-2 = 16 at most
    with pytest.raises(ConfigError, match="1 to 16"):
        edge_prism.load(path, operating_point=17)
    with pytest.raises(ConfigError, match="operating point"):
        edge_prism.load(path, operating_point=0)


def test_operating_point_on_a_plain_checkpoint_builds_its_prism_first(tiny_checkpoint):
    engine = edge_prism.load(tiny_checkpoint("llama"), operating_point=4)
    assert engine.model.operating_point == 4
    assert engine.source.suffix == ".prism"  # built into the user cache on first use


def test_same_inputs_and_seed_give_identical_bytes(tiny_checkpoint, tmp_path):
    a, b = tmp_path / "a.prism", tmp_path / "b.prism"
    refactor(tiny_checkpoint("mixtral"), a, FAST, progress=False)
    refactor(tiny_checkpoint("mixtral"), b, FAST, progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_existing_output_is_refused_without_force_and_kept(prism_of, tiny_checkpoint, tmp_path):
    out = tmp_path / "x.prism"
    shutil.copytree(prism_of("llama"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="--force"):
        refactor(tiny_checkpoint("llama"), out, FAST, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_failed_run_leaves_previous_output_intact(prism_of, tiny_checkpoint, tmp_path, monkeypatch):
    from edge_prism.refactor import gates

    out = tmp_path / "x.prism"
    shutil.copytree(prism_of("llama"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("simulated crash while fitting gates")

    monkeypatch.setattr(gates, "fit_linear_gate", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        refactor(tiny_checkpoint("llama"), out, FAST, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.prism"]  # no temporary directory left


def _damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_experts_file_is_refused(prism_of, tmp_path):
    path = _damaged_copy(prism_of("olmoe"), tmp_path / "d.prism")
    f = path / "experts.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(PrismCheckpointError, match="experts.safetensors.*refactor --force"):
        edge_prism.load(path)


def test_foreign_format_version_is_refused(prism_of, tmp_path):
    path = _damaged_copy(prism_of("olmoe"), tmp_path / "d.prism")
    man = json.loads((path / "prism.json").read_text())
    man["format_version"] = 999
    (path / "prism.json").write_text(json.dumps(man))
    with pytest.raises(PrismCheckpointError, match="format version 999"):
        edge_prism.load(path)


def test_garbage_manifest_is_refused(prism_of, tmp_path):
    path = _damaged_copy(prism_of("olmoe"), tmp_path / "d.prism")
    (path / "prism.json").write_text("{not json")
    with pytest.raises(PrismCheckpointError, match="prism.json"):
        edge_prism.load(path)


def test_changed_source_makes_the_checkpoint_stale(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("llama"), src)
    out = tmp_path / "s.prism"
    refactor(src, out, FAST, progress=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5  # same size, different bytes
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrismCheckpointError, match="stale"):
        edge_prism.load(out)


def test_calibration_file_and_bad_sub_experts(tiny_checkpoint, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(json.__doc__ * 20)
    out = tmp_path / "c.prism"
    cfg = RefactorConfig(**{**FAST.__dict__, "calib_files": (text,), "sub_experts": 4})
    refactor(tiny_checkpoint("llama"), out, cfg, progress=False)
    man = json.loads((out / "prism.json").read_text())
    assert man["sub_experts"] == [4, 4] and man["calibration"]["source"] == [str(text)]
    with pytest.raises(ConfigError, match="sub-experts 7"):
        refactor(tiny_checkpoint("llama"), tmp_path / "bad.prism",
                 RefactorConfig(**{**FAST.__dict__, "sub_experts": 7}), progress=False)


def test_manifest_records_profile_and_hottest_first_storage(prism_of):
    from edge_prism.refactor.prism import open_prism

    pc = open_prism(prism_of("olmoe"))
    assert pc.manifest["source"]["sha256"] and pc.manifest["family"] == "olmoe"
    for layer in range(2):
        freq = pc.gate_tensor(f"layers.{layer}.frequency")  # per unit id
        stored = freq[pc.order(layer)]  # in storage order
        assert (stored[:-1] >= stored[1:]).all()
        assert sorted(pc.order(layer).tolist()) == list(range(freq.numel()))


def test_cli_refactor_then_eval_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.prism"
    text = tmp_path / "eval.txt"
    text.write_text((edge_prism.__doc__ or "") * 10)
    args = ["refactor", str(tiny_checkpoint("qwen3_moe")), "--out", str(out), "--calib-tokens", "256"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert main(["eval", str(out), "--text-file", str(text), "--operating-points", "4,16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    prism_rows = [r for r in rows if r["curve"] == "prism"]
    assert sorted(r["operating_point"] for r in prism_rows) == [4, 16]
    assert all(r["perplexity"] > 1 for r in rows)
    assert sorted(r["top_k"] for r in rows if r["curve"] == "top-k") == [1, 2]  # baseline curve


# -- bounded memory: the source read, not mapped; the source model streamed ------------------------
def _bf16_copy(src: Path, dst: Path) -> Path:
    """``src`` with every float tensor stored as bfloat16 (how real MoE checkpoints ship)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(f).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def test_read_source_reads_what_the_mapping_holds(tiny_checkpoint):
    from edge_prism.loaders import open_checkpoint
    from edge_prism.refactor.stream import ReadSource, read_source

    raw = open_checkpoint(tiny_checkpoint("qwen3_moe"))
    src = read_source(raw.tensors)
    assert isinstance(src, ReadSource)
    for name in raw.tensors.names():
        assert torch.equal(src.get(name), raw.tensors.get(name)), name
        assert src.dtype(name) == raw.tensors.get(name).dtype
    ids = torch.tensor([5, 3, 5, 0, 255])
    assert torch.equal(src.rows("model.embed_tokens.weight", ids), raw.tensors.get("model.embed_tokens.weight")[ids])


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "qwen2_moe", "deepseek_v2"])
def test_streamed_source_model_computes_what_the_resident_one_does(family, tiny_checkpoint, tiny_engines):
    from edge_prism.families import build_spec
    from edge_prism.loaders import open_checkpoint
    from edge_prism.refactor.stream import read_source, streamed_model

    path = tiny_checkpoint(family)
    raw = open_checkpoint(path)
    model = streamed_model(build_spec(raw.config, where=str(path)), read_source(raw.tensors), path)
    assert model.dtype == torch.float32  # float32 weights: float32 compute
    ref = tiny_engines(family).logits(PROMPT)  # from an empty cache (the engine is shared)
    assert rel_err(model.forward(torch.tensor(PROMPT), all_logits=True), ref) < 1e-5


def test_streamed_model_of_bfloat16_weights_computes_in_bfloat16(tiny_checkpoint, tmp_path):
    from edge_prism.families import build_spec
    from edge_prism.loaders import open_checkpoint
    from edge_prism.refactor.stream import read_source, streamed_model

    path = _bf16_copy(tiny_checkpoint("qwen3_moe"), tmp_path / "bf16")
    raw = open_checkpoint(path)
    model = streamed_model(build_spec(raw.config, where=str(path)), read_source(raw.tensors), path)
    assert model.dtype == torch.bfloat16
    held = [lw.wqkv.w for lw in model.w.layers] + [lw.wo.w for lw in model.w.layers] + [model.w.lm_head.w]
    assert all(t.dtype == torch.bfloat16 for t in held)  # no float32 copies
    ref = edge_prism.load(path, device="cpu").logits(PROMPT)  # float32, the same weights
    assert rel_err(model.forward(torch.tensor(PROMPT), all_logits=True).float(), ref) < 0.05


def test_streamed_writer_writes_rows_in_the_given_order(tmp_path):
    from safetensors.torch import load_file

    from edge_prism.refactor.prism import StreamedSafetensors

    blocks = torch.randn(10, 3, 4, 8).to(torch.bfloat16)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    w = StreamedSafetensors(tmp_path / "e.safetensors", [("b", torch.bfloat16, (10, 3, 4, 8)),
                                                         ("o", torch.int64, (10,))])
    w.write("b", blocks, rows=order, chunk_bytes=3 * blocks[0].numel() * 2)  # several chunks
    w.write("o", order)
    got = load_file(w.close())
    assert torch.equal(got["b"], blocks[order]) and torch.equal(got["o"], order)


def test_bfloat16_source_refactors_exactly_with_its_generation_streamed(tiny_checkpoint, tmp_path, monkeypatch):
    from edge_prism.refactor import stream

    monkeypatch.setattr(stream, "RESIDENT_GENERATION_BYTES", 0)  # stream whatever the size
    monkeypatch.setenv("EDGE_PRISM_CACHE", str(tmp_path / "cache"))
    built = []
    real = stream.streamed_model
    monkeypatch.setattr(stream, "streamed_model", lambda *a, **kw: built.append(a) or real(*a, **kw))
    path = _bf16_copy(tiny_checkpoint("qwen3_moe"), tmp_path / "bf16")
    out = tmp_path / "bf16.prism"
    refactor(path, out, dataclasses.replace(FAST, quant="none"), progress=False)
    assert len(built) == 1  # the calibration text was written by the streamed model
    ids = PROMPT
    torch.testing.assert_close(edge_prism.load(out, device="cpu").logits(ids),
                               edge_prism.load(path, device="cpu").logits(ids), rtol=1e-4, atol=1e-4)
