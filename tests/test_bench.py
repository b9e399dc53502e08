"""The GPU training benchmark's model FLOPs (its MFU numerator) against PyTorch's own count, on CPU."""

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
