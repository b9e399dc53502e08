"""Training stages on the tiny model: CPT and SFT with LoRA, QLoRA and full, resume, ZeRO-3, bad input."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from doctune.chat import CUT_MARK
from doctune.records import SkipRecord
from doctune.sft.stage import tokenize_example
from doctune.stages import execute_stage
from doctune.tracking import Tracker
from doctune.train.artifacts import chat_template_of, materialize, read_meta
from doctune.train.core import TrainingError
from doctune.train.stage import prepare_tokenizer

SYSTEM = "You are a documentation assistant."


def corpus_texts(corpus: Path, pages: int = 12) -> list[str]:
    import pymupdf

    with pymupdf.open(corpus / "camlidl-1.04.doc.pdf") as doc:
        return [doc[i].get_text() for i in range(2, 2 + pages)]


def chat(question: str, answer: str) -> dict:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "meta": {}}


def sft_records(n: int) -> list[dict]:
    answer = "It writes interface {i} to a stub file.{more}"
    more = " It also checks the types of every argument."
    return [chat(f"What does option -x{i} of camlidl do?", answer.format(i=i, more=more * (i % 6))) for i in range(n)]


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def log_datasets(config, folders: dict[str, Path]):
    """Log dataset folders as the outputs of a synth stage run, as the pipeline would hand them over."""
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("train-test")
    run = tracker.start_stage_run("synth", parent, {})
    outputs = {name: run.log_output(name, folder, kind=f"{name}_dataset") for name, folder in folders.items()}
    run.finish(outputs)
    return tracker, parent, outputs


@pytest.fixture
def datasets(tmp_path, corpus):
    cpt, heldout = tmp_path / "cpt", tmp_path / "heldout"
    texts = corpus_texts(corpus)
    trained, held = [t for i, t in enumerate(texts) if i % 5], texts[::5]  # synth holds out a share of domain text
    write_jsonl(
        cpt / "train.jsonl", [{"text": t, "source": "domain"} for t in trained] + [{"text": "2 + 2 = 4.", "source": "replay"}]
    )
    write_jsonl(heldout / "heldout.jsonl", [{"text": t, "source": "domain"} for t in held])
    sft = tmp_path / "sft"
    records = sft_records(24)
    write_jsonl(sft / "train.jsonl", records[:20])
    write_jsonl(sft / "validation.jsonl", records[20:])
    (sft / "system_prompt.txt").write_text(SYSTEM)
    return {"cpt": cpt, "heldout": heldout, "sft": sft}


FAST = {"max_steps": 6, "save_steps": 3, "logging_steps": 1, "batch_size": 2, "warmup_ratio": 0.0}


def overrides(stage: str, **values) -> dict:
    fast = FAST | ({"eval_steps": 3} if stage == "sft" else {})
    return {f"{stage}.{k}": v for k, v in {**fast, **values}.items()}


def metric_history(tracker, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(tracker.client.get_metric_history(run_id, key), key=lambda m: m.step)]


# -- data preparation --------------------------------------------------------------


def test_prompt_tokens_carry_minus_100_and_the_reply_ends_in_eos(tiny_model_dir):
    tokenizer = prepare_tokenizer(tiny_model_dir)
    messages = chat("Which file holds the stubs?", "The file foo_stubs.c holds them.")["messages"]
    ids, labels, cut = tokenize_example(tokenizer, messages, max_length=512)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert not cut and len(ids) == len(labels)
    assert labels[: len(prompt)] == [-100] * len(prompt)
    trained = tokenizer.decode([t for t in labels if t != -100])
    assert trained.startswith("The file foo_stubs.c holds them.<|im_end|>")
    assert tokenizer.eos_token_id in [t for t in labels if t != -100]  # the real EOS is never masked, though pad == eos here


def test_long_prompts_are_cut_in_the_middle_of_the_user_turn_never_in_the_reply(tiny_model_dir, corpus):
    tokenizer = prepare_tokenizer(tiny_model_dir)
    context = "\n\n".join(corpus_texts(corpus, 4))
    user = f"Context:\n[1] FIRST PASSAGE {context}\n\nQuestion: what does camlidl generate?"
    messages = chat(user, "Stub code for OCaml.")["messages"]
    ids, labels, cut = tokenize_example(tokenizer, messages, max_length=256)
    assert cut and len(ids) <= 256
    text = tokenizer.decode(ids)
    assert CUT_MARK.strip() in text and "FIRST PASSAGE" in text and "Question: what does camlidl generate?" in text
    assert tokenizer.decode([t for t in labels if t != -100]).startswith("Stub code for OCaml.<|im_end|>")


def test_a_record_whose_cut_prompt_loses_the_passage_its_answer_cites_is_skipped(tiny_model_dir, corpus):
    tokenizer = prepare_tokenizer(tiny_model_dir)
    first, second = corpus_texts(corpus, 4)[:2], corpus_texts(corpus, 4)[2:]
    user = f"Context:\n[1] Guide, p. 1\n{' '.join(first)}\n\n[2] Guide, p. 2\n{' '.join(second)}\n\nQuestion: what?"
    ids, _, cut = tokenize_example(tokenizer, chat(user, "Stub code. [1]")["messages"], max_length=256)
    assert cut and "[1] Guide, p. 1" in tokenizer.decode(ids)  # the passage it cites is still shown
    with pytest.raises(SkipRecord, match=r"removed passage\(s\) \[2\] the answer cites"):
        tokenize_example(tokenizer, chat(user, "Stub code. [2]")["messages"], max_length=256)


def test_a_packed_row_attends_within_each_example_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from doctune.train.recipes import RowPackedCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, b = list(range(5, 25)), list(range(40, 52))
    row = {"input_ids": a + b, "labels": a + b, "seq_lengths": [len(a), len(b)]}
    short = {"input_ids": b, "labels": b, "seq_lengths": [len(b)]}
    batch = RowPackedCollator(pad_token_id=0)([row, short])  # the short row is padded: padding is its own sequence
    assert batch["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    with torch.no_grad():
        # No KV cache, as in training (SFTTrainer passes use_cache=False): packed rows are detected without one.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([b])).logits
    torch.testing.assert_close(packed[0, len(a) :], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[1, : len(b)], alone[0], atol=1e-4, rtol=1e-4)


def test_the_fused_lm_head_projects_only_labeled_positions_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.kernels.chunked_logprob import _use_triton

    from doctune.train.recipes import fused_head_on_labeled_positions

    # TRL's own decision (a training test earlier in this process may have installed doctune's); restored after.
    monkeypatch.setattr(trl_utils, "_use_triton", _use_triton)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    ids = torch.randint(5, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 40:48] = ids[:, 40:48]  # the answer: a few positions of a long prompt
    rows = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction, "apply", lambda hidden, *rest: rows.append(hidden.shape[0]) or apply(hidden, *rest)
    )

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.loss.detach(), out.entropy.detach(), grads

    loss, entropy, grads = loss_and_grads()
    fused_head_on_labeled_positions()
    labeled_loss, labeled_entropy, labeled_grads = loss_and_grads()
    assert rows == [2 * 63, 2 * 8]  # every shifted position, then only the labeled ones
    torch.testing.assert_close(labeled_loss, loss)
    torch.testing.assert_close(labeled_entropy, entropy)
    for name, grad in grads.items():
        torch.testing.assert_close(labeled_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_lora_inputs_skip_the_fp32_cast_with_the_same_loss_and_gradients(tiny_model_dir):
    """Under bf16 autocast the adapter's products run in bf16 either way: leaving out PEFT's cast of each adapter's
    input to fp32 (and of its gradient back) changes no number, and drops those copies."""
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from doctune.train.core import adapter_inputs_in_compute_dtype

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.casts += func.overloadpacket.__name__ == "_to_copy"
            return func(*args, **(kwargs or {}))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    adapters = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert {m.lora_A["default"].weight.dtype for m in adapters} == {torch.float32}  # fp32 for the optimizer
    ids = torch.randint(5, 200, (2, 32), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        counter = CountCasts()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, counter.casts

    loss, grads, casts = loss_and_grads()
    assert adapter_inputs_in_compute_dtype(model) == len(adapters)
    uncast_loss, uncast_grads, uncast_casts = loss_and_grads()
    assert torch.equal(uncast_loss, loss)
    assert all(torch.equal(uncast_grads[name], grad) for name, grad in grads.items())
    assert uncast_casts <= casts - 2 * len(adapters)  # at least the input's cast and its gradient's, per adapter


def test_a_bf16_lora_job_trains_with_uncast_adapter_inputs_and_reports_its_kernels(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback

    from doctune.config import SftConfig
    from doctune.train.core import TrainJob
    from doctune.train.launch import run_job

    ids = torch.randint(5, 200, (8, 64), generator=torch.Generator().manual_seed(0)).tolist()
    Dataset.from_dict({"input_ids": ids, "labels": ids}).save_to_disk(str(tmp_path / "data" / "train"))
    settings = SftConfig(method="lora", precision="bf16", batch_size=4, gradient_accumulation_steps=1, max_length=64,
                         max_steps=2, save_steps=100, eval_steps=100)  # fmt: skip
    job = TrainJob(
        stage="sft", settings=settings.model_dump(mode="json"), model_dir=str(tiny_model_dir),
        tokenizer_dir=str(tiny_model_dir), data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "checkpoints"),
        output_dir=str(tmp_path / "out"), learning_rate=2e-4,
    )  # fmt: skip
    seen = []

    class Adapters(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.extend(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A"))

    result = run_job(job, callbacks=[Adapters()])
    assert seen and not any(seen)
    assert result["precision"] == "bf16" and result["global_step"] == 2
    assert result["kernels"] == ("liger" if torch.cuda.is_available() else "none")  # auto: liger needs CUDA


def test_page_sft_refuses_kernels_liger_when_the_config_is_read(make_config):
    with pytest.raises(Exception, match="page_sft.kernels"):
        make_config(**{"page_sft.kernels": "liger"})
    assert make_config().page_sft.kernels == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_kernels_liger_without_a_gpu_is_refused_before_training(make_config, datasets):
    config = make_config(**overrides("sft", kernels="liger"))
    tracker, parent, data = log_datasets(config, {"sft": datasets["sft"]})
    with pytest.raises(TrainingError, match="kernels: liger needs a CUDA GPU"):
        execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    assert not (config.project.workdir / "cache" / "train").exists()  # nothing started


# -- stages --------------------------------------------------------------------------


def test_cpt_lora_loss_falls_and_logs_an_adapter_with_its_lineage(make_config, datasets):
    config = make_config(**overrides("cpt", max_steps=12, save_steps=6, learning_rate=2e-2, block_size=64))
    tracker, parent, data = log_datasets(config, {"cpt": datasets["cpt"], "heldout": datasets["heldout"]})
    result = execute_stage("cpt", config, tracker, parent, {"cpt": data["cpt"], "heldout": data["heldout"]})
    run = tracker.client.get_run(result.run_id)
    losses = metric_history(tracker, result.run_id, "cpt.loss")
    assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3])
    assert run.data.metrics["cpt.eval_loss_after"] < run.data.metrics["cpt.eval_loss_before"]
    assert run.data.metrics["cpt.padding_fraction"] == 0  # packed blocks
    for key in ("cpt.learning_rate", "cpt.grad_norm", "cpt.tokens_per_second", "cpt.peak_memory_mb"):
        assert key in run.data.metrics, key
    folder = tracker.fetch(result.outputs["model"])
    meta = read_meta(folder)
    assert meta["format"] == "adapter" and meta["base"] == {"spec": config.model.base_model}
    assert meta["datasets"]["cpt"] == data["cpt"].digest
    assert (folder / "adapter_model.safetensors").is_file() and chat_template_of(folder) == chat_template_of(
        config.model.base_model
    )


def test_sft_on_a_cpt_adapter_merges_it_first_and_keeps_the_chat_template(make_config, datasets, tiny_model_dir):
    config = make_config(**overrides("cpt", block_size=64), **overrides("sft", learning_rate=3e-3))
    tracker, parent, data = log_datasets(config, {"cpt": datasets["cpt"], "sft": datasets["sft"]})
    cpt = execute_stage("cpt", config, tracker, parent, {"cpt": data["cpt"]})
    merged = materialize(cpt.outputs["model"], config, tracker.fetch)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not [name for name, _ in model.named_modules() if "lora" in name.lower()]  # no adapter left to stack on

    sft = execute_stage("sft", config, tracker, parent, {"sft": data["sft"], "model": cpt.outputs["model"]})
    folder = tracker.fetch(sft.outputs["model"])
    meta = read_meta(folder)
    assert meta["base"] == {"ref": cpt.outputs["model"].to_dict()}
    # The template the data was rendered with travels with the model, byte for byte.
    assert chat_template_of(folder) == chat_template_of(tiny_model_dir)
    assert (folder / "system_prompt.txt").read_text() == SYSTEM
    run = tracker.client.get_run(sft.run_id)
    assert "sft.eval_loss" in run.data.metrics
    assert json.loads((folder / "train_result.json").read_text())["best_checkpoint"]
    final = materialize(sft.outputs["model"], config, tracker.fetch)
    assert (final / "model.safetensors").is_file()


def test_sft_packing_removes_padding(make_config, tmp_path):
    folder = tmp_path / "many"
    write_jsonl(folder / "train.jsonl", sft_records(96))
    results = {}
    for packing in (True, False):
        config = make_config(**overrides("sft", packing=packing, batch_size=4, max_steps=4, max_length=256))
        tracker, parent, data = log_datasets(config, {"sft": folder})
        run = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
        results[packing] = tracker.client.get_run(run.run_id).data.metrics["sft.padding_fraction"]
    assert results[True] < 0.05 < results[False]


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_other_methods_train_and_save(make_config, datasets, method):
    config = make_config(**overrides("sft", method=method, max_steps=3, learning_rate=1e-3))
    tracker, parent, data = log_datasets(config, {"sft": datasets["sft"]})
    result = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    folder = tracker.fetch(result.outputs["model"])
    assert read_meta(folder)["format"] == ("full" if method == "full" else "adapter")
    assert (folder / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).is_file()


def test_rope_scaling_grows_the_context_of_the_merged_model(make_config, datasets):
    config = make_config(
        **overrides("cpt", block_size=64, max_steps=2), **{"cpt.rope_scaling.type": "linear", "cpt.rope_scaling.factor": 2}
    )
    tracker, parent, data = log_datasets(config, {"cpt": datasets["cpt"]})
    result = execute_stage("cpt", config, tracker, parent, {"cpt": data["cpt"]})
    merged = json.loads((materialize(result.outputs["model"], config, tracker.fetch) / "config.json").read_text())
    assert merged["max_position_embeddings"] == 2048
    assert merged["rope_parameters"]["rope_type"] == "linear" and merged["rope_parameters"]["factor"] == 2


# -- bad input ------------------------------------------------------------------------


def test_bad_datasets_fail_before_training_naming_the_cause(make_config, tmp_path):
    config = make_config()
    empty = tmp_path / "empty"
    write_jsonl(empty / "train.jsonl", ["{not json", json.dumps({"messages": "hello"})])
    too_long = tmp_path / "long"
    write_jsonl(too_long / "train.jsonl", [chat("q " * 10, "a " * 400) for _ in range(3)])
    tracker, parent, data = log_datasets(config, {"empty": empty, "long": too_long})
    with pytest.raises(TrainingError, match=r"train.jsonl: no usable example \(2 skipped"):
        execute_stage("sft", config, tracker, parent, {"sft": data["empty"]})
    with pytest.raises(TrainingError, match="longer than max_length"):
        execute_stage("sft", make_config(**{"sft.max_length": 64}), tracker, parent, {"sft": data["long"]})


def test_a_lora_target_matching_no_module_is_an_error(make_config, datasets):
    config = make_config(**overrides("sft", **{"lora.target_modules": "[c_attn]"}))
    tracker, parent, data = log_datasets(config, {"sft": datasets["sft"]})
    with pytest.raises(TrainingError, match=r"\['c_attn'\] match no linear layer.*q_proj"):
        execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})


def test_qlora_without_4bit_kernels_is_refused_before_training(make_config, datasets, monkeypatch):
    import bitsandbytes.functional

    def unavailable(*args, **kwargs):
        raise RuntimeError("no 4-bit kernels for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", unavailable)
    config = make_config(**overrides("sft", method="qlora"))
    tracker, parent, data = log_datasets(config, {"sft": datasets["sft"]})
    with pytest.raises(TrainingError, match="method qlora needs bitsandbytes 4-bit"):
        execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    assert not (config.project.workdir / "cache" / "train").exists()  # nothing started


# -- resume and distributed ------------------------------------------------------------


def _killed_after_first_checkpoint(config_yaml: str, parent: str, inputs_json: str) -> None:
    """Child process: train, and die hard (no cleanup) right after the first checkpoint is written."""
    from transformers import TrainerCallback

    from doctune.artifacts import refs_from_json
    from doctune.config import config_from_yaml
    from doctune.train import launch

    class Preempt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            os._exit(137)

    original = launch.run_job
    launch.run_job = lambda job, callbacks=None: original(job, [Preempt()])
    config = config_from_yaml(config_yaml)
    execute_stage("cpt", config, Tracker(config), parent, refs_from_json(inputs_json))


def test_a_preempted_stage_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(make_config, datasets, tmp_path):
    from safetensors.torch import load_file

    from doctune.artifacts import refs_to_json

    settings = overrides("cpt", max_steps=8, save_steps=4, block_size=64, learning_rate=2e-3)
    interrupted = make_config(**settings)
    tracker, parent, data = log_datasets(interrupted, {"cpt": datasets["cpt"]})
    child = multiprocessing.get_context("spawn").Process(
        target=_killed_after_first_checkpoint, args=(interrupted.to_yaml(), parent, refs_to_json({"cpt": data["cpt"]}))
    )
    child.start()
    child.join(300)
    assert child.exitcode == 137
    resumed = execute_stage("cpt", interrupted, tracker, parent, {"cpt": data["cpt"]})
    metrics = tracker.client.get_run(resumed.run_id).data.metrics
    assert metrics["cpt.resumed_from_step"] == 4 and metrics["cpt.global_step"] == 8

    fresh = make_config(**settings, **{"project.workdir": str(tmp_path / "fresh")})
    fresh_tracker, fresh_parent, fresh_data = log_datasets(fresh, {"cpt": datasets["cpt"]})
    straight = execute_stage("cpt", fresh, fresh_tracker, fresh_parent, {"cpt": fresh_data["cpt"]})
    a = load_file(tracker.fetch(resumed.outputs["model"]) / "adapter_model.safetensors")
    b = load_file(fresh_tracker.fetch(straight.outputs["model"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


def test_zero3_full_fine_tune_over_two_processes(make_config, datasets, tmp_path):
    config = make_config(**overrides("sft", method="full", processes=2, max_steps=6, learning_rate=1e-3, batch_size=2))
    tracker, parent, data = log_datasets(config, {"sft": datasets["sft"]})
    result = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    folder = tracker.fetch(result.outputs["model"])
    outcome = json.loads((folder / "train_result.json").read_text())
    assert outcome["processes"] == 2 and outcome["loss_history"][-1] < outcome["loss_history"][0]
    args = json.loads((folder / "training_args.json").read_text())
    assert args["deepspeed"]["zero_optimization"]["stage"] == 3
    # The consolidated weights load in a fresh process and give finite logits.
    probe = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        "print(bool(torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()))"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("True"), done.stderr[-2000:]


@pytest.mark.real_model
def test_bundled_smollm2_cpt_lowers_domain_perplexity_and_sft_follows(make_config, datasets):
    settings = {
        **overrides("cpt", max_steps=10, block_size=256, batch_size=2, learning_rate=3e-4),
        **overrides("sft", max_steps=4, max_length=256, batch_size=2),
        "model.base_model": "bundled:smollm2-135m-instruct",
    }
    config = make_config(**settings)
    folders = {name: datasets[name] for name in ("cpt", "heldout", "sft")}
    tracker, parent, data = log_datasets(config, folders)
    cpt = execute_stage("cpt", config, tracker, parent, {"cpt": data["cpt"], "heldout": data["heldout"]})
    metrics = tracker.client.get_run(cpt.run_id).data.metrics
    assert metrics["cpt.perplexity_after"] < metrics["cpt.perplexity_before"]
    sft = execute_stage("sft", config, tracker, parent, {"sft": data["sft"], "model": cpt.outputs["model"]})

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialize(sft.outputs["model"], config, tracker.fetch)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does option -x3 of camlidl do?"}]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reply = model.generate(**ids, max_new_tokens=24, do_sample=False)[0][ids["input_ids"].shape[1] :]
    assert len(tokenizer.decode(reply, skip_special_tokens=True).split()) >= 2


# -- DPO ----------------------------------------------------------------------------------


def dpo_pairs(n: int) -> list[dict]:
    pairs = []
    for record in sft_records(n):
        prompt, reply = record["messages"][:2], record["messages"][2]
        wrong = {"role": "assistant", "content": reply["content"].replace("interface", "exception").replace("stub", "header")}
        pairs.append({"prompt": prompt, "chosen": [reply], "rejected": [wrong], "meta": {"strategy": "altered"}})
    return pairs


@pytest.fixture
def dpo_dataset(tmp_path):
    folder = tmp_path / "dpo"
    pairs = dpo_pairs(24)
    write_jsonl(folder / "train.jsonl", pairs[:20])
    write_jsonl(folder / "validation.jsonl", pairs[20:])
    (folder / "system_prompt.txt").write_text(SYSTEM)
    return folder


def test_dpo_on_the_sft_model_logs_rewards_and_its_lineage(make_config, datasets, dpo_dataset):
    config = make_config(**overrides("sft", max_steps=2), **overrides("dpo", max_steps=6, eval_steps=3, learning_rate=5e-3))
    tracker, parent, data = log_datasets(config, {"sft": datasets["sft"], "dpo": dpo_dataset})
    sft = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    dpo = execute_stage("dpo", config, tracker, parent, {"dpo": data["dpo"], "model": sft.outputs["model"]})
    metrics = tracker.client.get_run(dpo.run_id).data.metrics
    for key in ("dpo.rewards/chosen", "dpo.rewards/rejected", "dpo.rewards/margins", "dpo.rewards/accuracies"):
        assert key in metrics, key
    assert metrics["dpo.eval_rewards/accuracies_after"] > metrics["dpo.eval_rewards/accuracies_before"]
    meta = read_meta(tracker.fetch(dpo.outputs["model"]))
    assert meta["stage"] == "dpo" and meta["base"] == {"ref": sft.outputs["model"].to_dict()}


def tiny_dpo_trainer(make_config, dpo_dataset, tiny_model_dir, folder, **settings):
    """TRL's DPOTrainer as the DPO stage builds it, on the tiny model with LoRA, and its training pairs."""
    from datasets import load_from_disk

    from doctune.dpo.stage import prepare
    from doctune.train.core import TrainJob, load_model
    from doctune.train.recipes import dpo_trainer

    config = make_config(**overrides("dpo", learning_rate=5e-3, **settings))
    tokenizer = prepare_tokenizer(tiny_model_dir)
    prepare(config, dpo_dataset)(tokenizer, folder / "data")
    job = TrainJob(
        stage="dpo", settings=config.dpo.model_dump(mode="json"), model_dir=str(tiny_model_dir), tokenizer_dir="",
        data_dir=str(folder / "data"), checkpoint_dir=str(folder / "ckpt"), output_dir=str(folder / "out"),
        learning_rate=5e-3,
    )  # fmt: skip
    torch.manual_seed(0)
    model, peft_config = load_model(job, "fp32", len(tokenizer))
    train = load_from_disk(str(folder / "data" / "train"))
    return dpo_trainer(job, "fp32", model, peft_config, tokenizer, train, None), train


def test_dpo_with_lora_scores_the_reference_with_the_adapter_disabled(make_config, dpo_dataset, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer, _ = tiny_dpo_trainer(make_config, dpo_dataset, tiny_model_dir, tmp_path, max_steps=3)
    trainer.train()
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]  # no second model, no copy adapter
    probe = torch.tensor([[3, 14, 15, 92, 65]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = trainer.model.eval()
    with torch.no_grad(), policy.disable_adapter():
        torch.testing.assert_close(policy(probe).logits, base(probe).logits)
    with torch.no_grad():
        assert not torch.allclose(policy(probe).logits, base(probe).logits)  # the adapter did learn something


def test_dpo_with_a_chosen_nll_weight_keeps_the_chosen_replies_likely(make_config, dpo_dataset, tiny_model_dir, tmp_path):
    # Plain DPO may lower the chosen replies with the rejected ones; the RPO term holds them up.
    chosen_logps = {}
    for weight in (0.0, 1.0):
        trainer, train = tiny_dpo_trainer(
            make_config, dpo_dataset, tiny_model_dir, tmp_path / str(weight), max_steps=8, chosen_nll_weight=weight
        )
        trainer.train()
        chosen_logps[weight] = trainer.evaluate(train)["eval_logps/chosen"]
    assert chosen_logps[1.0] > chosen_logps[0.0]


def test_dpo_pairs_that_cannot_be_used_are_reported(make_config, tiny_model_dir, tmp_path):
    from doctune.dpo.stage import prepare

    folder = tmp_path / "bad-dpo"
    same = dpo_pairs(1)[0] | {"rejected": dpo_pairs(1)[0]["chosen"]}
    write_jsonl(folder / "train.jsonl", [same, {"prompt": "hi", "chosen": [], "rejected": []}])
    with pytest.raises(TrainingError, match=r"no usable pair \(2 skipped.*chosen and rejected are the same reply"):
        prepare(make_config(), folder)(prepare_tokenizer(tiny_model_dir), tmp_path / "data")


def test_two_node_zero3_runs_as_a_pytorchjob_and_the_stage_records_its_model(make_config, datasets, tmp_path, capsys):
    """nodes: 2 creates a PyTorchJob through the Kubernetes API (an emulator on 127.0.0.1 whose controller runs
    each node as a local torchrun, rendezvous via the PET_* variables the operator sets) and waits for it."""
    from kube_api import KubeApi

    with KubeApi() as kube:
        on_cluster = {"cluster.training_job.api_server": kube.url, "cluster.training_job.namespace": "ml",
                      "cluster.training_job.poll_s": 0.5, "cluster.cache_volume.mount_path": str(tmp_path)}  # fmt: skip
        training = overrides("sft", method="full", nodes=2, processes=1, max_steps=4, learning_rate=1e-3)
        config = make_config(**training, **on_cluster)
        tracker, parent, data = log_datasets(config, {"sft": datasets["sft"]})
        result = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
        ((_, namespace, name),) = [key for key in kube.deleted if key[0] == "configmaps"]
    job = next(obj for (kind, _, _), obj in kube.objects.items() if kind == "pytorchjobs")
    assert namespace == "ml" and name == f"{job['metadata']['name']}-deepspeed"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1 and job["spec"]["nprocPerNode"] == "1"
    assert [c["type"] for c in job["status"]["conditions"]] == ["Created", "Running", "Succeeded"]
    folder = tracker.fetch(result.outputs["model"])
    outcome = json.loads((folder / "train_result.json").read_text())
    assert outcome["global_step"] == 4 and outcome["loss_history"][-1] < outcome["loss_history"][0]
    args = json.loads((folder / "training_args.json").read_text())
    assert args["deepspeed"].endswith("ds_config.json")  # the ConfigMap, mounted
    assert "ZeRO" in kube.logs[job["metadata"]["name"]] or "deepspeed" in kube.logs[job["metadata"]["name"]].lower()
    out = capsys.readouterr().out
    assert f"PyTorchJob ml/{job['metadata']['name']}: created (2 nodes x 1 processes)" in out and "Succeeded" in out


def test_learning_rate_defaults_follow_stage_and_method_not_model_size(tmp_path, tiny_model_dir):
    from doctune.config import load_config
    from doctune.train.core import default_learning_rate

    large = tmp_path / "large"
    large.mkdir()
    (large / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    assert default_learning_rate("sft", "lora", large) == 2e-4 and default_learning_rate("dpo", "qlora", large) == 5e-6
    assert default_learning_rate("sft", "lora", tiny_model_dir) == 2e-4  # small models: the same standard rates
    assert default_learning_rate("dpo", "lora", tiny_model_dir) == 5e-6
    assert default_learning_rate("sft", "full", tiny_model_dir) == 2e-5
    assert default_learning_rate("cpt", "lora", tiny_model_dir) == 1e-4
    # The larger steps tuned on the bundled 135M model are the CPU demo profile's, set there explicitly.
    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "cpu-demo.yaml")
    assert (demo.cpt.learning_rate, demo.sft.learning_rate, demo.dpo.learning_rate) == (5e-4, 1e-3, 5e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choice")
def test_auto_precision_on_cpu_is_bf16_autocast_for_lora_only_where_amx_has_it(monkeypatch):
    from doctune.train import core

    monkeypatch.setattr("doctune.devices.cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert core.precision("auto", "lora") == "bf16"
    assert core.precision("auto", "full") == "fp32" and core.precision("auto", "qlora") == "fp32"
    monkeypatch.setattr("doctune.devices.cpu_flags", lambda: {"avx2"})
    assert core.precision("auto", "lora") == "fp32"
    assert core.precision("fp32", "lora") == "fp32"
