"""Model artifacts: a full model or a LoRA adapter on a recorded base, always with its tokenizer and chat template.

An adapter artifact names its base in `doctune_model.json`: a model spec (`bundled:...`, a folder) or the
reference of an earlier model artifact. `materialize` turns any of them into plain full-precision weights,
merging each adapter into its own base (never stacking adapters), and caches the result by digest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.cache import Cache
from doctune.config import RunConfig
from doctune.models import resolve_model

META_FILE = "doctune_model.json"


class ModelArtifactError(RuntimeError):
    """A model input that cannot be used: missing files, an unknown format, a broken lineage."""


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ModelArtifactError(f"{folder} is not a doctune model artifact: {META_FILE} is missing")
    return json.loads(path.read_text())


def write_meta(folder: Path, *, fmt: str, stage: str, method: str, base: dict, extra: dict | None = None) -> None:
    meta = {"format": fmt, "stage": stage, "method": method, "base": base, **(extra or {})}
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


def base_of(model_input: ArtifactRef | None, config: RunConfig) -> dict:
    """How an adapter trained on `model_input` names its base in its metadata."""
    if model_input is None:
        return {"spec": config.model.base_model}
    return {"ref": model_input.to_dict()}


def materialize(model_input: ArtifactRef | None, config: RunConfig, fetch) -> Path:
    """A local folder of full-precision weights, tokenizer and chat template for a model input.

    None means `model.base_model`. An adapter is merged into its (recursively materialized) base with
    `merge_and_unload` in fp32; merged folders are cached under cache/models/merged/<digest>.
    """
    cache = config.project.workdir / "cache"
    if model_input is None:
        return resolve_model(config.model.base_model, cache)
    folder = fetch(model_input)
    meta = read_meta(folder)
    if meta["format"] == "full":
        return folder
    if meta["format"] != "adapter":
        raise ModelArtifactError(f"model artifact {model_input.artifact_path} of run {model_input.run_id}: unknown format")
    base_folder = base_folder_of(meta, config, fetch)

    def build(scratch: Path) -> None:
        merge_adapter(base_folder, folder, scratch, rope_scaling=meta.get("rope_scaling"))

    return Cache(cache).folder("models/merged", model_input.digest.replace(":", "-"), build, "config.json")


def lineage(model_input: ArtifactRef, fetch) -> tuple[str, list[dict]]:
    """(base model spec, the stages that built this model, oldest first) from the chain of model metadata."""
    chain: list[dict] = []
    ref = model_input
    while True:
        meta = read_meta(fetch(ref))
        chain.append({"ref": ref.to_dict(), **{k: v for k, v in meta.items() if k != "base"}})
        if "spec" in meta["base"]:
            return meta["base"]["spec"], chain[::-1]
        ref = ArtifactRef.from_dict(meta["base"]["ref"])


def base_folder_of(meta: dict, config: RunConfig, fetch) -> Path:
    """Full-precision weights of the base an adapter was trained on."""
    base = meta["base"]
    if "spec" in base:
        return resolve_model(base["spec"], config.project.workdir / "cache")
    return materialize(ArtifactRef.from_dict(base["ref"]), config, fetch)


# Largest |logit| gap allowed between an adapter model and its merged weights, by merge precision (merge.max_logit_diff
# replaces it).
MERGE_TOLERANCE = {"fp32": 1e-3, "bf16": 0.5}


def merge_adapter(
    base_folder: Path, adapter_folder: Path, target: Path, dtype=None, rope_scaling: dict | None = None, probes=None
) -> dict:
    """Fold a LoRA adapter into full-precision base weights and save model + the adapter's tokenizer.

    `rope_scaling` ({type, factor}) is the base config change the adapter was trained with (long-context CPT).
    `probes` (token id lists, or for a vision-language model the processor's inputs of a page): the logits of adapter
    and merged model on them are compared; returns the gaps.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from doctune import vision
    from doctune.train.core import scaled_rope_config

    kwargs = {"config": scaled_rope_config(str(base_folder), **rope_scaling)} if rope_scaling else {}
    is_vision = vision.is_vision_model(base_folder)
    if is_vision:
        model = vision.load_model(base_folder, dtype or torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=dtype or torch.float32, **kwargs)
    adapted = PeftModel.from_pretrained(model, adapter_folder).eval()

    @torch.no_grad()
    def logits(m) -> list:
        return [
            m(**probe.to(m.device)).logits[0].float()
            if not isinstance(probe, list)
            else m(input_ids=torch.tensor([probe], device=m.device)).logits[0].float()
            for probe in probes or []
        ]

    before = logits(adapted)
    merged = adapted.merge_and_unload()
    gaps = [(a - b).abs() for a, b in zip(before, logits(merged), strict=True)]
    check = {}
    if gaps:
        check = {
            "max_logit_diff": max(g.max().item() for g in gaps),
            "mean_logit_diff": sum(g.mean().item() for g in gaps) / len(gaps),
            "probe_tokens": sum(int(g.shape[0]) for g in gaps),
        }
    merged.save_pretrained(target)
    (vision.load_processor if is_vision else AutoTokenizer.from_pretrained)(adapter_folder).save_pretrained(target)
    copy_generation_config(adapter_folder, target)
    return check


def copy_generation_config(source: Path, target: Path) -> None:
    if (Path(source) / "generation_config.json").is_file():
        shutil.copy2(Path(source) / "generation_config.json", Path(target) / "generation_config.json")


def end_of_turn_generation_config(folder: Path, tokenizer) -> None:
    """Generation stops at the end-of-turn token (the tokenizer's EOS) and pads with the pad token."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(folder)


def chat_template_of(folder: Path) -> str:
    """The chat template a model folder carries, as saved (chat_template.jinja or tokenizer_config.json)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if not template:
        raise ModelArtifactError(f"{folder} carries no chat template")
    return template
