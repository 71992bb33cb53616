"""Calibration text: the model's own replies (seeded, cached per model hash) mixed with the
stdlib docstrings, --calib-file overriding both, deterministic refactoring, and the held-out
evaluation domains (synthetic tiny weights)."""

from __future__ import annotations

import json

import pytest
import torch

from edge_prism.errors import ConfigError
from edge_prism.refactor import selfgen
from edge_prism.refactor.corpus import DOMAINS, MODULES, heldout_text
from edge_prism.refactor.refactor import RefactorConfig, _Collector, refactor

FAST = dict(calib_tokens=384, rows_per_expert=256, seq_len=128, quant="none")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh calibration-text cache, and a count of generation runs."""
    monkeypatch.setenv("EDGE_PRISM_CACHE", str(tmp_path / "cache"))
    runs = []
    real = selfgen._generate
    monkeypatch.setattr(selfgen, "_generate", lambda *a, **kw: runs.append(a) or real(*a, **kw))
    return runs


def test_generated_text_is_made_once_per_model_and_recipe(tiny_checkpoint, tmp_path, own_cache):
    src = tiny_checkpoint("llama")
    refactor(src, tmp_path / "a.prism", RefactorConfig(**FAST), progress=False)
    refactor(src, tmp_path / "b.prism", RefactorConfig(**FAST), progress=False)
    assert len(own_cache) == 1  # the second run read the cache
    for name in ("prism.json", "experts.safetensors", "gates.safetensors"):
        assert (tmp_path / "a.prism" / name).read_bytes() == (tmp_path / "b.prism" / name).read_bytes()
    cal = json.loads((tmp_path / "a.prism" / "prism.json").read_text())["calibration"]
    assert cal["source"] == ["self-generated:calib", "python-stdlib-docstrings:calib"]
    assert cal["generated"]["recipe"]["tokens"] == 192 and len(cal["generated"]["sha256"]) == 64
    refactor(src, tmp_path / "c.prism", RefactorConfig(**FAST, seed=1), progress=False)
    assert len(own_cache) == 2  # another recipe (seed) is other text


def test_generation_is_seeded_same_text_after_the_cache_is_lost(tiny_checkpoint, own_cache):
    from edge_prism.refactor.prism import hash_files

    src = tiny_checkpoint("llama")
    sha = hash_files(sorted(src.glob("*.safetensors")))
    recipe = selfgen.GenerationRecipe(tokens=200)
    first = selfgen.generated_text(src, sha, recipe, progress=False)
    for f in selfgen.cache_dir().iterdir():
        f.unlink()
    assert selfgen.generated_text(src, sha, recipe, progress=False) == first
    assert len(own_cache) == 2 and len(first) > 100
    assert first.startswith(selfgen.SEED_PROMPTS[0][1])


def test_a_damaged_cache_entry_is_made_again(tiny_checkpoint, own_cache):
    src = tiny_checkpoint("llama")
    recipe = selfgen.GenerationRecipe(tokens=64)
    text = selfgen.generated_text(src, "0" * 64, recipe, progress=False)
    (entry,) = selfgen.cache_dir().iterdir()
    rec = json.loads(entry.read_text())
    entry.write_text(json.dumps(dict(rec, text=rec["text"][:-5])))  # checksum no longer matches
    assert selfgen.generated_text(src, "0" * 64, recipe, progress=False) == text
    assert len(own_cache) == 2


def test_calib_file_overrides_the_generated_text(tiny_checkpoint, tmp_path, own_cache):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "f.prism"
    refactor(tiny_checkpoint("llama"), out, RefactorConfig(**FAST, calib_files=(text,)), progress=False)
    cal = json.loads((out / "prism.json").read_text())["calibration"]
    assert own_cache == [] and cal["source"] == [str(text)] and cal["generated"] is None


def test_docstrings_only_when_the_share_is_zero(tiny_checkpoint, tmp_path, own_cache):
    out = tmp_path / "d.prism"
    refactor(tiny_checkpoint("llama"), out, RefactorConfig(**FAST, generated_share=0.0), progress=False)
    assert own_cache == []
    assert json.loads((out / "prism.json").read_text())["calibration"]["source"] == ["python-stdlib-docstrings:calib"]


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_invalid_share_is_refused(share):
    with pytest.raises(ConfigError, match="generated_share"):
        RefactorConfig(generated_share=share)


@pytest.mark.parametrize("family", ["llama", "mixtral"])  # dense: every token reaches the reservoir
def test_two_refactors_in_one_process_give_identical_bytes(family, tiny_checkpoint, tmp_path):
    a, b = tmp_path / "a.prism", tmp_path / "b.prism"
    cfg = RefactorConfig(calib_tokens=384, rows_per_expert=128, seq_len=128)  # reservoir sampling in use
    refactor(tiny_checkpoint(family), a, cfg, progress=False)
    refactor(tiny_checkpoint(family), b, cfg, progress=False)
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_reservoir_keeps_the_later_row_when_two_pick_one_slot():
    """Batched reservoir sampling equals the one-row-at-a-time algorithm."""
    class Spec:
        hidden_size, num_layers = 2, 1
        ffn = []

    cap, rows = 4, torch.arange(200, dtype=torch.float32)[:, None].repeat(1, 2)  # row i = (i, i)
    col = _Collector.__new__(_Collector)  # only the reservoir is under test
    col.spec, col.cap, col.gen = Spec, cap, torch.Generator().manual_seed(3)
    col.rows, col.seen = {}, {}
    for batch in rows.split(64):
        col._add((0, 0), batch)
    gen = torch.Generator().manual_seed(3)
    ref = rows[:cap].clone()
    for start in range(0, 200, 64):
        n = min(64, 200 - start)
        first = max(start, cap)
        if first >= start + n:
            continue
        idx = torch.arange(first, start + n)
        pick = (torch.rand(idx.numel(), generator=gen) * (idx + 1)).long()
        for i, p in zip(idx.tolist(), pick.tolist()):
            if p < cap:
                ref[p] = rows[i]
    assert torch.equal(col.inputs(0, 0), ref)


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_domains_are_real_text_calibration_never_saw(domain):
    if domain == "dialogue":
        pytest.importorskip("chatterbot_corpus")
        pytest.importorskip("yaml")
    text = heldout_text(domain)
    assert len(text) > 20_000
    if domain == "code":
        from edge_prism.refactor.corpus import CODE_MODULES

        assert not set(CODE_MODULES) & set(MODULES)
    prompts = [p for _, p in selfgen.SEED_PROMPTS]
    assert not any(p in text for p in prompts)


def test_unknown_domain_names_the_choices():
    with pytest.raises(ConfigError, match="dialogue"):
        heldout_text("poetry")


def test_output_mass_partitions_differently_and_stays_exact_at_full_k(prism_of, tiny_engines):
    import edge_prism
    from edge_prism.refactor.prism import open_prism

    prompt = list(range(40, 64))
    out, act = prism_of("llama", mass="output"), prism_of("llama", mass="activation")
    torch.testing.assert_close(edge_prism.load(out).logits(prompt), tiny_engines("llama").logits(prompt),
                               rtol=1e-4, atol=1e-4)
    assert not torch.equal(open_prism(out).gate_tensor("layers.0.perm"), open_prism(act).gate_tensor("layers.0.perm"))
    with pytest.raises(ConfigError, match="mass"):
        RefactorConfig(mass="energy")


def test_a_large_source_writes_its_text_streamed_and_seeded(tiny_checkpoint, own_cache, monkeypatch):
    from edge_prism.refactor import stream

    monkeypatch.setattr(stream, "RESIDENT_GENERATION_BYTES", 0)  # every source counts as large
    built = []
    real = stream.streamed_model
    monkeypatch.setattr(stream, "streamed_model", lambda *a, **kw: built.append(a) or real(*a, **kw))
    src = tiny_checkpoint("qwen3_moe")
    recipe = selfgen.GenerationRecipe(tokens=96)
    first = selfgen.generated_text(src, "1" * 64, recipe, progress=False)
    for f in selfgen.cache_dir().iterdir():
        f.unlink()
    assert selfgen.generated_text(src, "1" * 64, recipe, progress=False) == first
    assert len(built) == 2 and first.startswith(selfgen.SEED_PROMPTS[0][1])


def test_selfgen_imports_without_the_api():
    """The api <-> refactor.selfgen cycle is gone: selfgen's imports are at module level, and
    importing it does not import edge_prism.api."""
    import ast
    import subprocess
    import sys

    code = "import sys, edge_prism.refactor.selfgen; sys.exit('edge_prism.api' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    tree = ast.parse(open(selfgen.__file__, encoding="utf-8").read())
    inner = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
             if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert inner == []
