"""`polykv export`: each engine's artifact from a plan, and one-line refusals that write nothing."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import tiny_gemma3, tiny_llama, tiny_qwen2
from typer.testing import CliRunner

from polykv.errors import InputError, OutputError, PlanMismatchError
from polykv.export import ExportOptions, export_plan
from polykv.models import fingerprint
from polykv.plan import SCHEMA_VERSION, CostModel, LayerPlan, Plan

QWEN = fingerprint(tiny_qwen2().config)
LLAMA = fingerprint(tiny_llama().config)
GEMMA = fingerprint(tiny_gemma3().config)  # layers: sliding (window 8), sliding, full
GEMMA5 = {**GEMMA, "num_layers": 5, "num_kv_heads": [1] * 5, "head_dim": [32] * 5}
GEMMA5["layer_types"] = GEMMA["layer_types"][:2] + ["full_attention"] * 3


def full(budget: int = 64) -> tuple:
    return ("full", budget, {})


def win(budget: int, sinks: int = 0) -> tuple:
    return ("window", budget, {"window": budget - sinks, "sinks": sinks})


def save_plan(path, fp: dict, layers: list[tuple], target: dict | None = None):
    cm = CostModel.for_fingerprint(fp)
    lps = [LayerPlan(i, p, b, params) for i, (p, b, params) in enumerate(layers)]
    used = sum(cm.cost(i, lp.budget) for i, lp in enumerate(lps))
    provenance = {"polykv_version": "test", "solver": "test"}
    plan = Plan(SCHEMA_VERSION, "tiny", fp, 8.0, used, cm.unit, lps, None, provenance, target)
    plan.save(path)
    return path


def test_hf_config_and_vllm_overrides(tmp_path):
    plan = save_plan(tmp_path / "p.json", QWEN, [win(8), full()], {"engine": "hf", "reference_context": 64})
    export_plan(plan, "hf-config", tmp_path / "hf.json")
    doc = json.loads((tmp_path / "hf.json").read_text())
    want = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8, "use_sliding_window": True}
    assert doc["config_patch"] == doc["from_pretrained_kwargs"] == want
    assert doc["source"]["plan_hash"] == Plan.load(plan).plan_hash
    export_plan(plan, "vllm", tmp_path / "vllm.json")
    assert json.loads((tmp_path / "vllm.json").read_text()) == want


def test_trtllm_windows_sinks_and_full_layers(tmp_path):
    plan = save_plan(
        tmp_path / "p.json", LLAMA, [win(12, 4), full(), win(12, 4)], {"engine": "trtllm", "reference_context": 512}
    )
    export_plan(plan, "trtllm", tmp_path / "kv.yaml")
    assert (tmp_path / "kv.yaml").read_text() == (
        "kv_cache_config:\n  max_attention_window: [12, 512, 12]\n  sink_token_length: 4\n"
    )
    export_plan(plan, "trtllm", tmp_path / "kv.json", ExportOptions(max_seq_len=2048))
    config = json.loads((tmp_path / "kv.json").read_text())["kv_cache_config"]
    assert config == {"max_attention_window": [12, 2048, 12], "sink_token_length": 4}
    untargeted = save_plan(tmp_path / "u.json", LLAMA, [win(12, 4), full(), full()])
    with pytest.raises(InputError, match="pass --max-seq-len"):
        export_plan(untargeted, "trtllm", tmp_path / "none.yaml")
    assert not (tmp_path / "none.yaml").exists()


@pytest.mark.parametrize(
    "fmt,fp,layers,message",
    [
        ("trtllm", LLAMA, [win(8), ("snapkv", 8, {}), full()], "layer 1 uses snapkv .*solve --target trtllm"),
        ("hf-config", QWEN, [win(8), win(16)], "windows of 2 sizes \\(8 on layers 0; 16 on layers 1\\)"),
        ("hf-config", GEMMA, [win(5), full(7), full()], "5 on layers 0; 8 on layers 1"),
        ("vllm", QWEN, [win(8, 2), full()], "layers 0 have attention sinks"),
        ("hf-config", LLAMA, [win(8), full(), full()], "llama does not read per-layer layer_types"),
        ("llamacpp", LLAMA, [win(8), full(), full()], "llama.cpp runs no sliding window .* for llama"),
        ("llamacpp", GEMMA5, [win(5), win(5), full(), win(5), full()], "sliding layers 0, 1, 3 follow no period"),
        ("trtllm", LLAMA, [win(8, 2), win(8, 4), full()], "different sink counts \\[2, 4\\]"),
    ],
)
def test_a_plan_the_engine_cannot_run_is_refused_and_nothing_written(tmp_path, fmt, fp, layers, message):
    plan = save_plan(tmp_path / "p.json", fp, layers)
    with pytest.raises(InputError, match=message):
        export_plan(plan, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_target_output_and_model(tmp_path, tiny_hf_dir):
    plan = save_plan(tmp_path / "p.json", QWEN, [win(8), full()])
    with pytest.raises(InputError, match="unknown export target 'sglang'; use one of hf-config, vllm, trtllm"):
        export_plan(plan, "sglang", tmp_path / "o.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        export_plan(plan, "hf-config", tmp_path / "file" / "o.json")
    with pytest.raises(PlanMismatchError, match="plan was solved for tiny"):
        export_plan(plan, "hf-config", tmp_path / "o.json", ExportOptions(model=str(tiny_hf_dir)))
    assert not (tmp_path / "o.json").exists()


def tiny_gguf(path, layers: int = 3) -> None:
    """A GGUF with Gemma 3's metadata for the tiny Gemma geometry and one tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_key_length(32)
    writer.add_embedding_length(64)
    writer.add_sliding_window(8)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llamacpp_copies_the_gguf_with_the_window_and_period(tmp_path):
    import gguf

    tiny_gguf(tmp_path / "src.gguf")
    plan = save_plan(tmp_path / "p.json", GEMMA, [win(5), win(5), full()])
    export_plan(plan, "llamacpp", tmp_path / "out.gguf", ExportOptions(model=str(tmp_path / "src.gguf")))
    reader = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    assert reader.get_field("gemma3.attention.sliding_window").contents() == 5
    assert reader.get_field("gemma3.attention.sliding_window_pattern").contents() == 3  # layers 0, 1 slide
    assert reader.get_field("general.name").contents() == "tiny"
    assert reader.tensors[0].data.tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()


def test_llamacpp_refuses_another_model_and_a_missing_gguf_package(tmp_path, monkeypatch):
    tiny_gguf(tmp_path / "src.gguf", layers=4)
    plan = save_plan(tmp_path / "p.json", GEMMA, [win(5), win(5), full()])
    options = ExportOptions(model=str(tmp_path / "src.gguf"))
    with pytest.raises(PlanMismatchError, match="is gemma3 with 4 layers"):
        export_plan(plan, "llamacpp", tmp_path / "out.gguf", options)
    with pytest.raises(InputError, match="copies a GGUF file, and 'tiny' is none"):
        export_plan(plan, "llamacpp", tmp_path / "out.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(InputError, match="needs the gguf package; install it with: pip install gguf"):
        export_plan(plan, "llamacpp", tmp_path / "out.gguf", options)
    assert not (tmp_path / "out.gguf").exists()


def test_export_cli(tmp_path):
    from polykv_cli.main import app

    plan = save_plan(tmp_path / "p.json", QWEN, [win(8), full()])
    ok = CliRunner().invoke(app, ["export", str(plan), "--to", "vllm", "--out", str(tmp_path / "o.json")])
    assert ok.exit_code == 0 and "1 of 2 layers sliding, window 8" in ok.output
    bad = CliRunner().invoke(app, ["export", str(plan), "--to", "trtllm", "--out", str(tmp_path / "t.yaml")])
    assert bad.exit_code == 2 and "pass --max-seq-len" in bad.output and len(bad.output.strip().splitlines()) == 1
