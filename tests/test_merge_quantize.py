"""Merge and quantize on the tiny model (and, marked, the bundled SmolLM2): equivalence, cards, GGUF in both runtimes."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import SYSTEM, datasets, log_datasets, overrides  # noqa: F401 (datasets is a fixture)

from doctune.merge.stage import MergeError
from doctune.quantize.gguf_export import GgufExportError, write_gguf
from doctune.quantize.stage import REPORT_FILE
from doctune.stages import execute_stage
from doctune.train.artifacts import materialize, read_meta

PROBE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does option -x3 of camlidl do?"}]


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.fixture
def sft_model(make_config, datasets):  # noqa: F811
    """A LoRA SFT model with a clearly trained adapter, logged as the pipeline logs it."""
    config = make_config(**overrides("sft", max_steps=3, learning_rate=3e-2), **{"synth.replay.share": 0.0})
    tracker, parent, data = log_datasets(config, {k: datasets[k] for k in ("sft", "heldout", "cpt")})
    sft = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    return config, tracker, parent, data, sft.outputs["model"]


def test_merge_gives_a_standalone_model_that_behaves_like_the_adapter_model(sft_model, tiny_model_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, tracker, parent, _, model_ref = sft_model
    merged = execute_stage("merge", config, tracker, parent, {"model": model_ref})
    folder = tracker.fetch(merged.outputs["model"])
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert not [k for k in handle.keys() if "lora" in k]  # noqa: SIM118
    tokenizer = AutoTokenizer.from_pretrained(folder)
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tracker.fetch(model_ref))
    merged_logits = logits_of(AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer)
    torch.testing.assert_close(merged_logits, logits_of(adapter_model.eval(), tokenizer), atol=1e-4, rtol=0)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter was folded in, not dropped

    meta = read_meta(folder)
    assert meta["format"] == "full" and meta["base_model"] == str(tiny_model_dir)
    assert [link["stage"] for link in meta["lineage"]] == ["sft"]
    check = json.loads((folder / "doctune_model.json").read_text())["merge_check"]
    assert 0 <= check["max_logit_diff"] <= check["tolerance"] == 1e-3 and check["precision"] == "fp32"
    card = (folder / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "| sft | lora |" in card and "largest logit gap" in card
    assert (folder / "system_prompt.txt").read_text() == SYSTEM
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    metrics = tracker.client.get_run(merged.run_id).data.metrics
    assert metrics["merge.max_logit_diff"] == check["max_logit_diff"]


def test_a_merge_outside_the_tolerance_fails_and_saves_nothing(sft_model):
    config, tracker, parent, _, model_ref = sft_model
    strict = config.model_copy(update={"merge": config.merge.model_copy(update={"max_logit_diff": 1e-12})})
    with pytest.raises(MergeError, match=r"largest logit gap .* > merge.max_logit_diff 1e-12 \(fp32\); nothing was saved"):
        execute_stage("merge", strict, tracker, parent, {"model": model_ref})
    assert not tracker.stage_runs(parent, "merge")  # the run failed: nothing downstream can pick up a model
    (failed,) = tracker.client.search_runs([tracker.experiment_id], "tags.`doctune.stage` = 'merge'")
    assert failed.info.status == "FAILED" and not tracker.client.list_artifacts(failed.info.run_id, "model")


def test_quantize_writes_checked_variants_and_reports_the_ones_it_cannot(sft_model):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, tracker, parent, data, model_ref = sft_model
    merged = execute_stage("merge", config, tracker, parent, {"model": model_ref}).outputs["model"]
    config = config.model_copy(
        update={
            "quantize": config.quantize.model_copy(
                update={"variants": ["gguf-f16", "gguf-q4_k", "gguf-q4_k_m", "gguf-q8_0", "nf4"]}
            )
        }
    )
    inputs = {"model": merged, "heldout": data["heldout"], "cpt": data["cpt"]}
    result = execute_stage("quantize", config, tracker, parent, inputs)
    assert set(result.outputs) == {"gguf-f16", "gguf-q4_k_m", "gguf-q8_0", "nf4", "report"}
    report = json.loads((tracker.fetch(result.outputs["report"]) / REPORT_FILE).read_text())
    assert "GGUF type q4_k for LlamaForCausalLM: cannot be written by the gguf package" in report["failed"]["gguf-q4_k"]
    assert "through llama.cpp's quantizer: q4_k_m" in report["failed"]["gguf-q4_k"]
    # A K-quant comes from llama.cpp's own quantizer, with what each tensor became (fallbacks where rows are short).
    k_quant = report["variants"]["gguf-q4_k_m"]
    assert k_quant["quantizer"].startswith("llama.cpp") and sum(k_quant["tensor_types"].values()) > 0
    # ... weighted by an importance matrix of the CPT domain text: 7 linear layers in each of the 2 blocks.
    assert k_quant["importance_matrix"] and report["importance_matrix"]["tensors"] == 14
    assert report["importance_matrix"]["tokens"] > 0 and not report["variants"]["gguf-q8_0"].get("importance_matrix")
    assert (tracker.fetch(result.outputs["gguf-q4_k_m"]) / "model-q4_k_m.gguf").is_file()
    f16 = report["variants"]["gguf-f16"]
    assert f16["perplexity_ratio"] == pytest.approx(1.0, abs=2e-3)
    for row in report["variants"].values():
        assert row["size_bytes"] > 0 and row["tokens_per_s"] > 0 and row["generated_tokens"] >= 1
    assert report["variants"]["gguf-q4_k_m"]["size_bytes"] < report["variants"]["gguf-q8_0"]["size_bytes"] < f16["size_bytes"]
    metrics = tracker.client.get_run(result.run_id).data.metrics
    assert metrics["quantize.gguf-q8_0.perplexity_ratio"] == report["variants"]["gguf-q8_0"]["perplexity_ratio"]

    # The f16 file reads back with gguf's reader and loads in transformers with the merged model's logits.
    folder = tracker.fetch(result.outputs["gguf-f16"])
    reader = gguf.GGUFReader(str(folder / "model-f16.gguf"))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    merged_folder = tracker.fetch(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
    torch.testing.assert_close(logits_of(from_gguf, tokenizer), logits_of(reference, tokenizer), atol=2e-3, rtol=0)

    nf4 = tracker.fetch(result.outputs["nf4"])
    assert json.loads((nf4 / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_the_importance_matrix_changes_how_llama_cpp_rounds_the_weights(tiny_model_dir, tmp_path):
    import gguf
    import numpy as np

    from doctune.quantize.gguf_export import requantize
    from doctune.quantize.importance import importance_matrix

    texts = ["The option -x3 of camlidl sets the stub level.", "Each group holds several questions, shuffled."] * 20
    imatrix = importance_matrix(tiny_model_dir, texts, block_size=32, max_blocks=8)
    assert imatrix.blocks == 8 and imatrix.tokens == 8 * 32
    for layer in (0, 1):
        for kind, width in (("attn_q", 64), ("attn_k", 64), ("attn_v", 64), ("attn_output", 64), ("ffn_gate", 64),
                            ("ffn_up", 64), ("ffn_down", 128)):  # fmt: skip
            values = imatrix.values[f"blk.{layer}.{kind}.weight"]
            assert values.shape == (width,) and np.isfinite(values).all() and (values > 0).all()
    # q, k and v read the same normed input, so they share one column weighting, as in llama.cpp's imatrix tool.
    np.testing.assert_array_equal(imatrix.values["blk.0.attn_q.weight"], imatrix.values["blk.0.attn_v.weight"])

    f16 = tmp_path / "f16.gguf"
    write_gguf(tiny_model_dir, f16, "f16")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    requantize(f16, plain, "q4_k_m", 1)
    assert requantize(f16, weighted, "q4_k_m", 1, imatrix=imatrix.values)["importance_matrix"]
    tensors = lambda path: {t.name: bytes(t.data) for t in gguf.GGUFReader(str(path)).tensors}  # noqa: E731
    plain_tensors, weighted_tensors = tensors(plain), tensors(weighted)
    changed = [name for name in plain_tensors if plain_tensors[name] != weighted_tensors[name]]
    assert changed and all(name in imatrix.values for name in changed)  # weighted tensors, and only those, differ


def test_an_architecture_without_a_gguf_writer_is_named_with_the_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(GgufExportError, match=r"GGUF type q8_0: architecture GPT2LMHeadModel is not supported"):
        write_gguf(tmp_path, tmp_path / "m.gguf", "q8_0")


@pytest.mark.real_model
def test_bundled_smollm2_merged_and_q8_0_gguf_answer_in_their_runtimes(make_config, datasets):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = make_config(
        **overrides("sft", max_steps=2, max_length=256),
        **{"model.base_model": "bundled:smollm2-135m-instruct", "quantize.variants": "[gguf-q8_0]"},
        **{"quantize.block_size": 256, "quantize.eval_blocks": 4, "quantize.generate_tokens": 24},
    )
    tracker, parent, data = log_datasets(config, {"sft": datasets["sft"], "heldout": datasets["heldout"]})
    sft = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    merged = execute_stage("merge", config, tracker, parent, {"model": sft.outputs["model"]}).outputs["model"]
    folder = materialize(merged, config, tracker.fetch)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reply = model.generate(**ids, max_new_tokens=24, do_sample=False)[0][ids["input_ids"].shape[1] :]
    assert len(tokenizer.decode(reply, skip_special_tokens=True).split()) >= 3

    result = execute_stage("quantize", config, tracker, parent, {"model": merged, "heldout": data["heldout"]})
    report = json.loads((tracker.fetch(result.outputs["report"]) / REPORT_FILE).read_text())
    q8 = report["variants"]["gguf-q8_0"]
    assert q8["pre_tokenizer"] == "smollm"
    words = q8["reply"].split()
    assert len(words) >= 5 and sum(w.strip(".,:;()'\"").isalpha() for w in words) >= 0.6 * len(words), q8["reply"]
    assert q8["perplexity_ratio"] <= 1.02
    assert q8["size_bytes"] < 0.3 * report["merged"]["size_bytes"]
