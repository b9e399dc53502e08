"""The page track's model side on tiny random VLMs: SmolVLM (Idefics3, with its real processor) and Qwen3-VL (built from
its config; its processor needs torchvision): what LoRA adapts, what the loss covers, NF4 of the language model only."""

from __future__ import annotations

import json

import pytest
import torch

from doctune import vision
from doctune.page_schema import SELF_SUPERVISED_SCHEMA, canonical_json

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True
            },
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 256, "deepstack_visual_indexes": [0],
        },
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).eval()


def trainable_after_lora(model, train_projector: bool) -> list[str]:
    from peft import LoraConfig, get_peft_model

    targets = vision.language_lora_targets(model, ATTENTION, include_mlp=False)
    save = [vision.projector_module(model)] if train_projector else None
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=save))
    return [name for name, p in peft.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("family", ["smolvlm", "qwen3-vl"])
def test_lora_adapts_the_language_model_only_and_the_projector_on_request(family, tiny_vlm_dir):
    build = (lambda: vision.load_model(tiny_vlm_dir)) if family == "smolvlm" else tiny_qwen3_vl
    plain = trainable_after_lora(build(), train_projector=False)
    assert plain and all("lora_" in name for name in plain)
    assert not [n for n in plain if vision.in_vision_encoder(n) or vision.in_projector(n)]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in plain} == set(ATTENTION)
    with_projector = trainable_after_lora(build(), train_projector=True)
    extra = set(with_projector) - set(plain)
    assert extra and all(vision.in_projector(n) for n in extra)
    mlp = vision.language_lora_targets(build(), ATTENTION, include_mlp=True)
    assert {n.rsplit(".", 1)[-1] for n in mlp} == {*ATTENTION, "gate_proj", "up_proj", "down_proj"}


def test_a_target_the_language_model_lacks_is_named(tiny_vlm_dir):
    with pytest.raises(vision.VisionModelError, match=r"\['qkv'\] match no language-model linear layer"):
        vision.language_lora_targets(vision.load_model(tiny_vlm_dir), ["q_proj", "qkv"], include_mlp=False)


def test_full_fine_tunes_freeze_the_vision_encoder(tiny_vlm_dir):
    model = vision.load_model(tiny_vlm_dir)
    assert vision.freeze_vision_encoder(model, train_projector=True) > 0
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(vision.in_vision_encoder(n) for n in frozen)
    assert any(vision.in_projector(n) for n, p in model.named_parameters() if p.requires_grad)


def test_the_loss_covers_the_json_reply_and_its_end_of_turn_only(tiny_vlm_dir, corpus):
    """TRL's collator on the records page SFT writes: every labeled token is the reply's or its EOS."""
    import pymupdf
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    processor = vision.load_processor(tiny_vlm_dir)
    with pymupdf.open(corpus / "camlidl-1.04.doc.pdf") as doc:
        pixmap = doc[0].get_pixmap(dpi=50)
    image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
    reply = canonical_json({"title": "CamlIDL", "page_number": "1", "table_rows": [["a", "b"]]}, SELF_SUPERVISED_SCHEMA)
    record = {"prompt": [{"role": "user", "content": "Extract."}], "completion": [{"role": "assistant", "content": reply}],
              "images": [image]}  # fmt: skip
    batch = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)([record])
    labeled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    text = processor.tokenizer.decode(labeled)
    assert text.strip().startswith(reply) and text.strip().endswith("<end_of_utterance>")
    assert json.loads(text.strip().removesuffix("<end_of_utterance>")) == json.loads(reply)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token in batch["input_ids"][0].tolist() and image_token not in labeled


def test_nf4_quantizes_the_language_model_and_keeps_the_vision_side(tiny_vlm_dir):
    model = vision.load_model(tiny_vlm_dir, quantization_config=vision.nf4_config())
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and not [n for n in quantized if vision.in_vision_encoder(n) or vision.in_projector(n)]
    assert any(vision.in_vision_encoder(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_a_qwen_vl_processor_that_cannot_load_names_torchvision(tmp_path, tiny_vlm_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_vlm_dir / name).read_bytes())
    tiny_qwen3_vl().config.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Qwen3VLProcessor",
        "image_processor": {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "merge_size": 2},
    }))  # fmt: skip
    with pytest.raises(vision.VisionModelError, match="torchvision"):
        vision.load_processor(tmp_path)


def test_page_sft_learning_rates_follow_the_guide_per_method():
    from doctune.train.core import default_learning_rate

    assert [default_learning_rate("page_sft", m) for m in ("lora", "qlora", "full")] == [2e-4, 1.5e-4, 2e-5]
    assert default_learning_rate("sft", "qlora") == default_learning_rate("sft", "lora")  # the text track's stay as they were
