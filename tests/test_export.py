"""edge-prism export: prism checkpoints as standard Hugging Face MoE directories.

Every export is loaded by transformers' AutoModelForCausalLM without remote code; at full K
its logits must equal edge-prism's (and so the original model's) within 1e-3 relative.
Tiny checkpoints are random (synthetic): they test exactness and plumbing, not quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from edge_prism.errors import ConfigError, UnsupportedModelError
from edge_prism.export import RECORD, ExportConfig, engine_weights, export, router_rows

FAMILIES = ("llama", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "qwen2_moe-mlp_only_layers")
TARGET = {"llama": "MixtralForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
          "qwen2_moe-mlp_only_layers": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
          "olmoe": "OlmoeForCausalLM"}
SUB_EXPERTS = 4  # the tiny experts are 128 wide (dense FFNs 256): 4 parts of 32 (64)
TEXT = "The quick brown fox jumps over the lazy dog. Then the fox ran home to the den."


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference value."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _hf(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()  # trust_remote_code stays off


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()  # [T, V]


def _ids(engine) -> list[int]:
    return engine.tokenizer.encode(TEXT, add_bos=False)


@pytest.fixture(scope="module")
def exported(prism_of, tmp_path_factory):
    """``exported(family, k=None, dtype='float32', **ExportConfig)`` -> (prism, export dir), cached."""
    made: dict[str, tuple[Path, Path]] = {}

    def make(family: str, k: int | None = None, dtype: str = "float32", **kw):
        key = json.dumps([family, k, dtype, kw], sort_keys=True)
        if key not in made:
            prism = prism_of(family, sub_experts=SUB_EXPERTS)
            out = tmp_path_factory.mktemp("export") / f"{family}-{k}-{dtype}"
            export(prism, out, ExportConfig(operating_point=k, dtype=dtype, calib_tokens=512,
                                            measure_tokens=256, **kw))
            made[key] = prism, out
        return made[key]

    return make


# -- exactness at full K -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_full_k_export_reproduces_edge_prism(family, exported):
    import edge_prism

    prism, out = exported(family)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [TARGET[family]]
    engine = edge_prism.load(prism, device="cpu", dtype="float32", dequantize=True)
    ids = _ids(engine)
    want = engine.logits(ids)  # [T, V]
    got = _hf_logits(_hf(out), ids)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-3
    record = json.loads((out / RECORD).read_text())
    assert record["operating_point"] == record["full_operating_point"]
    assert record["measured"] == {}  # exact by construction: nothing to measure


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_full_k_router_copies_the_parent_row_per_part(family, exported):
    """Each sub-expert is an expert of width n; the top-k is K = top_k x S."""
    import edge_prism

    prism, out = exported(family)
    engine = edge_prism.load(prism, device="cpu", dtype="float32", dequantize=True)
    f = engine.spec.ffn[0]
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == f.top_k * SUB_EXPERTS
    model = _hf(out)
    layer = model.model.layers[0].mlp
    router = (layer.gate if hasattr(layer, "gate") else layer.block_sparse_moe.gate).weight
    assert router.shape == (f.num_experts * SUB_EXPERTS, engine.spec.hidden_size)
    if engine.spec.is_moe:
        parent = engine.model.w.layers[0].router  # [E, D]
        torch.testing.assert_close(router, parent.repeat_interleave(SUB_EXPERTS, dim=0))
    else:
        assert bool((router == 0).all())  # a dense FFN: every part weighs 1/S, S folded into W_down


@pytest.mark.slow
def test_default_model_full_k_export_reproduces_edge_prism(tmp_path):
    """SmolLM2-135M-Instruct (a dense llama GGUF) -> a Mixtral checkpoint of 16 experts, top-16."""
    import edge_prism
    from edge_prism.api import default_prism
    from edge_prism.refactor.corpus import stdlib_text

    prism = default_prism(progress=False)
    out = tmp_path / "default.hf"
    report = export(prism, out, ExportConfig(dtype="float32"))
    assert report.exact and report.target == "mixtral"
    engine = edge_prism.load(prism, device="cpu", dtype="float32", dequantize=True)
    ids = engine.tokenizer.encode(stdlib_text("eval"), add_bos=False)[:128]
    assert _rel(_hf_logits(_hf(out), ids), engine.logits(ids)) < 1e-3


# -- below full K ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_three_quarter_k_export_loads_and_reports_its_agreement(family, exported):
    import edge_prism

    prism, _ = exported(family)
    engine = edge_prism.load(prism, device="cpu", dtype="float32", dequantize=True)
    f = next(f for f in engine.spec.ffn if f.routed or not engine.spec.is_moe)
    k = 3 * f.top_k * SUB_EXPERTS // 4
    _, out = exported(family, k=k)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == k
    logits = _hf_logits(_hf(out), _ids(engine))
    assert bool(torch.isfinite(logits).all())
    m = json.loads((out / RECORD).read_text())["measured"]
    for key in ("same_selection", "selected_overlap", "worst_layer_same_selection"):
        assert 0.0 <= m[key] <= 1.0
    if family == "llama":
        # A dense FFN's K parts are edge-prism's rule exactly; only the gate bias is approximated.
        assert m["selected_overlap"] > 0.95
    else:
        # edge-prism's quotas give each routed expert 3 of its 4 parts; the engine's top-K over
        # E*S logits fills the top expert first (4 + 2): most, not all, selected parts agree.
        assert m["selected_overlap"] > 0.5


def test_router_rows_give_the_dense_selection_exactly_when_the_bias_is_linear():
    """With x . v = 1 exactly (a constant input coordinate), top-K of the exported router is
    edge-prism's top-K of the linear gate, and the weights are 1 within part_scale."""
    from edge_prism.select import quotas

    torch.manual_seed(0)
    T, D, S, K = 64, 16, 8, 6
    x = torch.randn(T, D)
    x[:, 0] = 1.0  # the constant the fitted direction finds
    w, b = torch.randn(1, D, S), 3 * torch.randn(1, S)
    v = torch.zeros(D)
    v[0] = 1.0
    scores = x @ w[0] + b[0]  # [T, S]: edge-prism's gate scores
    spread = float((scores.amax(1) - scores.amin(1)).max())
    rows = router_rows(None, w, b, v, 1e-3 / spread)  # [S, D]
    got = engine_weights(x @ rows.t(), K, norm=True, fold=float(K))  # [T, S]
    want = torch.zeros(T, S).scatter_(1, scores.topk(quotas(K, 1, S)[0], dim=1).indices, 1.0)
    assert torch.equal(got != 0, want != 0)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


# -- files ------------------------------------------------------------------------------------------
def test_export_is_sharded_with_an_index_and_loads(exported):
    import edge_prism

    prism, out = exported("qwen2_moe", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    engine = edge_prism.load(prism, device="cpu", dtype="float32", dequantize=True)
    ids = _ids(engine)
    assert _rel(_hf_logits(_hf(out), ids), engine.logits(ids)) < 1e-3


def test_export_carries_tokenizer_chat_template_and_stop_tokens(exported):
    from transformers import AutoTokenizer

    from conftest import IM_END_ID
    from edge_prism.tokenizer import Tokenizer

    prism, out = exported("qwen3_moe")
    ours = Tokenizer.from_hf_dir(prism)
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT, add_bos=False)
    messages = [{"role": "user", "content": "Hi there"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages)
    assert (out / "chat_template.jinja").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert IM_END_ID in generation["eos_token_id"]


def test_bfloat16_export_stores_and_loads_bfloat16(exported):
    from safetensors import safe_open

    _, out = exported("mixtral", dtype="bfloat16")
    shard = next(out.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}
    model = _hf(out, torch.bfloat16)
    assert bool(torch.isfinite(_hf_logits(model, [1, 2, 3])).all())


# -- output handling and errors ----------------------------------------------------------------------
def test_existing_output_needs_force_and_force_replaces_an_earlier_export(prism_of, tmp_path):
    prism = prism_of("llama", sub_experts=SUB_EXPERTS)
    out = tmp_path / "out"
    export(prism, out, ExportConfig(dtype="float32"))
    with pytest.raises(ConfigError, match="--force"):
        export(prism, out, ExportConfig(dtype="float32", operating_point=3, calib_tokens=64, measure_tokens=64))
    export(prism, out, ExportConfig(dtype="float32", operating_point=3, calib_tokens=64, measure_tokens=64),
           force=True)
    assert json.loads((out / RECORD).read_text())["operating_point"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old directories left


def test_force_never_replaces_a_directory_that_is_not_an_export(prism_of, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an edge-prism export"):
        export(prism_of("llama", sub_experts=SUB_EXPERTS), out, ExportConfig(dtype="float32"), force=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_the_previous_output_intact(prism_of, tmp_path, monkeypatch):
    import edge_prism.export as ex

    prism = prism_of("llama", sub_experts=SUB_EXPERTS)
    out = tmp_path / "out"
    export(prism, out, ExportConfig(dtype="float32"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_copy_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        export(prism, out, ExportConfig(dtype="bfloat16"), force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_source_the_target_cannot_express_is_a_one_line_error(prism_of, tmp_path):
    prism = tmp_path / "biased.prism"
    shutil.copytree(prism_of("llama", sub_experts=SUB_EXPERTS), prism)
    manifest = json.loads((prism / "prism.json").read_text())
    manifest["config"]["attention_bias"] = True
    (prism / "prism.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedModelError) as err:
        export(prism, tmp_path / "out", ExportConfig(dtype="float32"))
    assert "attention bias" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_operating_point_and_non_prism_input_are_config_errors(prism_of, tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="operating point"):
        export(prism_of("llama", sub_experts=SUB_EXPERTS), tmp_path / "a", ExportConfig(operating_point=99))
    with pytest.raises(ConfigError, match="not a prism checkpoint"):
        export(tiny_checkpoint("llama"), tmp_path / "b")
    with pytest.raises(ConfigError, match="dtype"):
        ExportConfig(dtype="int8")


def test_cli_export_writes_the_directory_and_errors_exit_2(prism_of, tmp_path, capsys):
    from edge_prism.cli import main

    prism = prism_of("olmoe", sub_experts=SUB_EXPERTS)
    out = tmp_path / "olmoe.hf"
    assert main(["export", str(prism), "--out", str(out), "-k", "6", "--dtype", "float32",
                 "--calib-tokens", "64"]) == 0
    assert "vllm serve" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 6
    assert main(["export", str(prism), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
