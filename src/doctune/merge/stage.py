"""Merge: the final adapter folded into full-precision base weights, checked against the adapter model, with a card.

fp32 on CPU, bf16 on a GPU; a QLoRA adapter is merged into its base reloaded unquantized, never into 4-bit
weights. Before anything is saved, the logits of the adapter model and the merged model on fixed chat prompts
must agree within `merge.max_logit_diff`; the gap is logged either way.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from doctune.artifacts import MODEL_KIND, ArtifactRef
from doctune.chat import conversation, render_ids
from doctune.config import RunConfig
from doctune.devices import precision, torch_dtype
from doctune.records import SYSTEM_PROMPT_FILE, read_text_file
from doctune.tracking import StageRun
from doctune.train.artifacts import (
    MERGE_TOLERANCE,
    ModelArtifactError,
    base_folder_of,
    end_of_turn_generation_config,
    lineage,
    materialize,
    merge_adapter,
    read_meta,
    write_meta,
)

CARD_FILE = "README.md"
# What a merged folder keeps of its input: weights are rewritten; training leftovers stay behind.
CARRIED_FILES = (SYSTEM_PROMPT_FILE,)


class MergeError(RuntimeError):
    """The merged model does not behave like the adapter model it came from."""


def probe_ids(tokenizer, system_prompt: str | None, prompts: list[str]) -> list[list[int]]:
    """Token ids of each verify prompt as serving renders it: system prompt, user turn, generation prompt."""
    return [render_ids(tokenizer, conversation(prompt, system_prompt), generation_prompt=True) for prompt in prompts]


def stage_metrics(tracker: StageRun, chain: list[dict]) -> dict[str, dict[str, float]]:
    """The metrics each training stage of the lineage logged under its own name (eval losses, rewards...)."""
    metrics = {}
    for link in chain:
        run_id, stage = link.get("stage_run"), link.get("stage")
        if not run_id:
            continue
        logged = tracker.client.get_run(run_id).data.metrics
        metrics[stage] = {k: v for k, v in sorted(logged.items()) if k.startswith(f"{stage}.")}
    return metrics


def model_card(base_spec: str, chain: list[dict], metrics: dict[str, dict[str, float]], check: dict) -> str:
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base_spec}",
        "tags: [doctune, merged]",
        "---",
        "",
        "# doctune merged model",
        "",
        f"Base model: `{base_spec}`. Built by these stages, oldest first (every adapter merged in full precision):",
        "",
        "| stage | method | stage run | datasets (sha256) |",
        "|---|---|---|---|",
    ]
    for link in chain:
        datasets = ", ".join(f"{k} `{v[7:19]}`" for k, v in sorted(link.get("datasets", {}).items())) or "-"
        lines.append(f"| {link['stage']} | {link.get('method', '-')} | `{link.get('stage_run', '-')}` | {datasets} |")
    lines += ["", "## Metrics so far", ""]
    for stage, values in metrics.items():
        shown = ", ".join(f"{k.split('.', 1)[1]} {v:.4g}" for k, v in values.items()) or "none logged"
        lines.append(f"- **{stage}**: {shown}")
    if check:
        lines += [
            "",
            "## Merge check",
            "",
            f"Adapter model vs merged model on {check['probe_tokens']} prompt tokens: largest logit gap "
            f"{check['max_logit_diff']:.3g} (allowed {check['tolerance']:.3g}), mean {check['mean_logit_diff']:.3g}, "
            f"precision {check['precision']}.",
        ]
    lines += ["", "The chat template in `tokenizer_config.json`/`chat_template.jinja` and the system prompt in "
              f"`{SYSTEM_PROMPT_FILE}` are the ones training used; serve with both.", ""]  # fmt: skip
    return "\n".join(lines)


def merge_model(config: RunConfig, model_input: ArtifactRef, fetch, target: Path) -> dict:
    """Write the standalone model for `model_input` into `target`; returns the merge check."""
    from transformers import AutoTokenizer

    folder = fetch(model_input)
    meta = read_meta(folder)
    prec = precision(config.merge.precision, "merge")
    if meta["format"] == "full":  # a full fine-tune: nothing to fold in
        source = materialize(model_input, config, fetch)
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, target / path.name)
        return {"precision": "as trained", "adapter": False}
    base_folder = base_folder_of(meta, config, fetch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    system = read_text_file(folder, SYSTEM_PROMPT_FILE)
    check = merge_adapter(
        base_folder, folder, target,
        dtype=torch_dtype(prec),
        rope_scaling=meta.get("rope_scaling"),
        probes=probe_ids(tokenizer, system, config.merge.verify_prompts),
    )  # fmt: skip
    tolerance = config.merge.max_logit_diff or MERGE_TOLERANCE[prec]
    check |= {"precision": prec, "tolerance": tolerance, "adapter": True}
    if check["max_logit_diff"] > tolerance:
        raise MergeError(
            f"merged model differs from the adapter model {model_input.run_id}/{model_input.artifact_path}: largest "
            f"logit gap {check['max_logit_diff']:.4g} > merge.max_logit_diff {tolerance:.4g} ({prec}); nothing was saved"
        )
    return check


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    from transformers import AutoTokenizer

    model_input = inputs["model"]
    folder = tracker.fetch(model_input)
    base_spec, chain = lineage(model_input, tracker.fetch)
    with tempfile.TemporaryDirectory(prefix="doctune-merge-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        check = merge_model(config, model_input, tracker.fetch, out)
        if not (out / "config.json").is_file():
            raise ModelArtifactError(f"model {model_input.run_id}/{model_input.artifact_path} produced no config.json")
        for name in CARRIED_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
        end_of_turn_generation_config(out, AutoTokenizer.from_pretrained(out))
        metrics = stage_metrics(tracker, chain)
        (out / CARD_FILE).write_text(model_card(base_spec, chain, metrics, check))
        write_meta(
            out, fmt="full", stage="merge", method=read_meta(folder)["method"], base={"ref": model_input.to_dict()},
            extra={"base_model": base_spec, "lineage": chain, "merge_check": check},
        )  # fmt: skip
        tracker.log_metrics({f"merge.{k}": v for k, v in check.items() if isinstance(v, float)})
        tracker.log_text(json.dumps(check, indent=1), "merge_check.json")
        return {"model": tracker.log_output("model", out, kind=MODEL_KIND)}
