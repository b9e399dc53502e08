"""The benchmarks' own arithmetic, on CPU: the GPU training benchmark's model FLOPs (its MFU numerator) against
PyTorch's own count, the VLM training benchmark's code path on a tiny shape, the serving load test's measured
windows, and the retriever benchmark's rates and verdict."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


def load_gpu_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_train_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_forward_flops_per_token_match_what_pytorch_counts():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = load_gpu_bench()
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="eager",  # products PyTorch can count
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    seq_len = 48
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.randint(0, 300, (2, seq_len)))
    counted = counter.get_total_flops() / (2 * seq_len)
    assert abs(counted - bench.forward_flops_per_token(config, seq_len)) / counted < 0.01


def test_the_gpu_benchmark_says_it_needs_cuda_and_writes_nothing_without_it(tmp_path, monkeypatch, capsys):
    bench = load_gpu_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_train_bench.py", "--out", str(tmp_path)])
    bench.main()
    assert "no CUDA device" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_the_gpu_benchmark_runs_every_row_of_a_tiny_model_on_cpu(tmp_path, monkeypatch, capsys):
    """The GPU benchmark's code paths on a tiny Llama: plain steps (every variant computes the same function, so the
    same first loss) and doctune's SFT job; each row in a process of its own, or all in one; nothing written."""
    bench = load_gpu_bench()
    argv = ["gpu_train_bench.py", "--tiny", "--steps", "1", "--warmup", "1", "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", [*argv, "--in-process"])
    bench.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"kind"')]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["method"] for r in steps] == [v.name for v in bench.STEP_VARIANTS if not v.needs_cuda]
    assert len({r["first_loss"] for r in steps}) == 1 and all(r["tokens_per_s"] > 0 for r in rows)
    assert [r["method"] for r in rows if r["kind"] == "sft"] == [
        f"{v.name} -> none" for v in bench.SFT_VARIANTS if not v.needs_cuda
    ]
    monkeypatch.setattr("sys.argv", [*argv, "--match", "lora (PEFT;sft full, kernels none"])
    bench.main()
    own = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"kind"')]
    assert [r["method"] for r in own] == ["lora (PEFT as it comes: input cast, dropout 0.05)", "sft full, kernels none -> none"]
    assert not (tmp_path / "out").exists()


def load_vlm_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "vlm_train_bench.py"
    spec = importlib.util.spec_from_file_location("vlm_train_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_vlm_benchmark_trains_lora_and_qlora_steps_of_the_tiny_shape_on_cpu(tmp_path, monkeypatch):
    """The GPU benchmark's code path on a tiny Qwen3-VL: one page (128 x 128: 64 patches, 16 image tokens), NF4 on
    CPU; one row per method with its tokens/s, no memory figure and no verdict off the GPU."""
    bench = load_vlm_bench()
    monkeypatch.setattr("sys.argv", [
        "vlm_train_bench.py", "--device", "cpu", "--shape", "tiny", "--checkpointing", "off", "--pixels", "16384",
        "--text-tokens", "20", "--reply-tokens", "16", "--steps", "2", "--warmup", "1", "--out", str(tmp_path),
    ])  # fmt: skip
    bench.main()
    result = json.loads((tmp_path / "vlm_train.json").read_text())
    assert result["page"] == {"side_pixels": 128, "grid": [1, 8, 8], "patches": 64, "image_tokens": 16, "text_tokens": 20,
                              "reply_tokens": 16, "seq_len": 52}  # fmt: skip
    runs = result["runs"]
    assert [(r["method"], r["checkpointing"]) for r in runs] == [("lora", False), ("qlora", False)]
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["reply_tokens_per_s"] > 0 for r in runs)
    assert all(r["peak_memory_gb"] is None and r["vs_guide"] == "n/a" for r in runs)
    # LoRA r 16 on q/k/v/o of both layers (hidden 128; q 256 wide, k/v 128): the same adapter whatever the base.
    assert runs[0]["trainable"] == runs[1]["trainable"] == 2 * 16 * ((128 + 256) * 2 + (128 + 128) * 2)
    rows = [line for line in (tmp_path / "vlm_train.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0:2] for row in rows] == [["| LoRA bf16", "off"], ["| QLoRA NF4", "off"]]


def test_the_vlm_benchmark_judges_the_8b_peak_against_the_guide_and_needs_cuda_without_device_cpu(tmp_path, monkeypatch, capsys):
    bench = load_vlm_bench()
    assert bench.page_grid(1003520, 16, 2) == (992, 62)  # pages.render.max_pixels: 961 image tokens after the merge
    assert [bench.versus_guide("qwen3-vl-8b", "lora", gb) for gb in (20.0, 30.0, 50.0)] == ["below", "within", "above"]
    assert bench.versus_guide("qwen3-vl-8b", "qlora", 23.9) == "within" and bench.versus_guide("tiny", "qlora", 1) == "n/a"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["vlm_train_bench.py", "--out", str(tmp_path)])
    bench.main()
    assert "no CUDA device" in capsys.readouterr().out and not list(tmp_path.iterdir())
    monkeypatch.setattr("sys.argv", ["vlm_train_bench.py", "--device", "cpu", "--out", str(tmp_path)])  # the 8B shape
    with pytest.raises(SystemExit):
        bench.main()
    assert "only --shape tiny" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_the_serve_benchmark_measures_each_phase_from_when_every_client_has_a_reply(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))  # its `results_io` import
    path = Path(__file__).resolve().parents[1] / "bench" / "serve_bench.py"
    spec = importlib.util.spec_from_file_location("serve_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def reply(client, phase, start, end):
        return {"client": client, "phase": phase, "start": start, "end": end, "status": 200, "tokens": 8}

    records = [
        reply(0, 0, 0.0, 1.0), reply(0, 0, 1.0, 3.0),  # client 0's second reply ends before client 1's first: ramp-up
        reply(1, 0, 0.0, 4.0), reply(0, 0, 3.0, 5.0), reply(1, 0, 4.0, 6.0), reply(0, 0, 5.0, 8.0),
        reply(1, 1, 6.0, 9.0),  # another phase: not counted in phase 0
    ]  # fmt: skip
    assert bench.window(records, 0, clients=2, n=3) == (4.0, records[3:6])
    assert bench.window(records, 0, clients=2, n=4) is None  # not enough replies yet
    assert bench.window(records, 1, clients=2, n=1, sent={1: 6.0}) is None  # client 0 has sent nothing in phase 1
    # After a switch the window opens when the last client sent its first request in the phase.
    assert bench.window(records, 1, clients=2, n=1, sent={0: 8.0, 1: 6.0}) == (8.0, records[6:7])
    summary = bench.summarize([bench.window(records, 0, clients=2, n=3)])
    assert summary["requests"] == 3 and summary["seconds"] == 4.0 and summary["requests_per_s"] == 0.75
    assert summary["p50_s"] == 2.0 and summary["mean_completion_tokens"] == 8
    assert bench.NoLog().write({"request_id": "x"}) is None


def test_the_retriever_benchmark_counts_examples_per_second_and_judges_recall_at_5_by_its_p_value(monkeypatch, tmp_path):
    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))  # its `results_io` import
    spec = importlib.util.spec_from_file_location("retriever_bench", bench_dir / "retriever_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def metrics(mrr, r1, r5):
        return {"mrr@10": mrr, "recall@1": r1, "recall@5": r5, "recall@10": r5, "ndcg@10": mrr}

    p_values = {"mrr@10": 0.0, "recall@1": 0.004, "recall@5": 0.36, "recall@10": 1.0, "ndcg@10": 0.002}
    report = {
        "chunks": 1000, "selected": "tuned", "selected_on": {"questions": "validation"}, "mining": {"mode": "dense"},
        "settings": {"epochs": 3.0, "batch_size": 32},
        "training": {"pairs": 185, "hard_negatives": 1, "without_negatives": 0, "steps": 15},
        "comparison": {
            "queries": 130,
            "metrics": {"base": metrics(0.75, 0.6, 0.992), "tuned": metrics(0.84, 0.72, 0.969),
                        "bm25": metrics(0.5, 0.4, 0.7), "hybrid": metrics(0.83, 0.72, 0.97)},
            "p_values": {"base vs tuned": p_values},
        },
    }  # fmt: skip
    builds = {"base": [10.0, 8.0], "tuned": [8.5, 9.0], "load": [0.5], "bm25": [1.0]}
    result = bench.summarize(report, "bundled:all-minilm-l6-v2", 60.0, 2.0, 90.0, builds)
    assert result["training"]["examples_per_second"] == 9.25  # 185 pairs x 3 epochs / 60 s
    assert result["training"]["examples_seen_per_second"] == 8.0  # 15 steps x 32 / 60 s: the last partial batch dropped
    assert result["index_build"]["base"] == {"seconds": 8.0, "runs": [10.0, 8.0], "chunks_per_second": 125.0}
    assert result["index_build_tuned_over_base"] == round((1000 / 8.5) / 125.0, 3)
    assert result["tuned_vs_base"]["recall@5"] == {"ratio": round(0.969 / 0.992, 3), "p_value": 0.36}
    assert result["target"]["meets"] is False  # lower, and p >= 0.05
    text = "\n".join(bench.markdown(result))
    assert "**not met**" in text and "no room is left" in text and "on: MRR@10, Recall@1, NDCG@10." in text
    assert "Significantly below base on: Recall@5" not in text

    # Higher alone does not meet the target: the paired test must say so too.
    report["comparison"]["metrics"]["tuned"]["recall@5"] = 0.995
    assert bench.summarize(report, "e", 60.0, 2.0, 90.0, builds)["target"]["meets"] is False
    p_values["recall@5"] = 0.01
    met = bench.summarize(report, "e", 60.0, 2.0, 90.0, builds)
    assert met["target"]["meets"] is True

    # The summary row of bench/report.py carries the target and its verdict.
    spec = importlib.util.spec_from_file_location("report", bench_dir / "report.py")
    report_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_module)
    (tmp_path / "retriever.json").write_text(json.dumps(met))
    monkeypatch.setattr(report_module, "RESULTS", tmp_path)
    rows = {row["benchmark"]: row for row in report_module.rows()}
    (recall,) = [row for name, row in rows.items() if "Recall@5" in name]
    assert recall["target"] == "> 1 at p < 0.05" and recall["meets"] is True and "p = 0.010" in recall["benchmark"]
    assert any("p < 0.001" in name for name in rows)  # MRR@10
