"""The benchmarks' own arithmetic, on CPU: the GPU training benchmark's model FLOPs (its MFU numerator) against
PyTorch's own count, and the serving load test's measured windows."""

import importlib.util
from pathlib import Path

import torch


def load_gpu_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_train_bench", path)
    module = importlib.util.module_from_spec(spec)
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
