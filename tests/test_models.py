from __future__ import annotations

import time

import pytest

from doctune.models import ModelResolutionError, resolve_model


def test_unknown_bundled_model_lists_the_bundled_ones(tmp_path):
    with pytest.raises(ModelResolutionError, match="unknown bundled model 'gpt-9'; bundled models: smollm2-135m-instruct"):
        resolve_model("bundled:gpt-9", tmp_path)


def test_local_folder_must_hold_a_model(tmp_path):
    with pytest.raises(ModelResolutionError, match="no such folder"):
        resolve_model(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="neither config.json nor tokenizer.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


def test_local_folder_resolves_to_itself(tiny_tokenizer_dir, tmp_path):
    assert resolve_model(str(tiny_tokenizer_dir), tmp_path) == tiny_tokenizer_dir.resolve()


def test_unreachable_hub_id_says_what_to_use_instead(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="model hub could not provide it.*bundled:smollm2-135m-instruct"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)


@pytest.mark.real_model
def test_bundled_smollm2_converts_once_and_chats(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model("bundled:smollm2-135m-instruct", tmp_path)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    started = time.monotonic()
    assert resolve_model("bundled:smollm2-135m-instruct", tmp_path) == folder
    assert time.monotonic() - started < 1  # cached: no second conversion

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert "quantization_config" not in model.config.to_dict()
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
