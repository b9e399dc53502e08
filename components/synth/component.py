from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("synth"), install_kfp_package=False)
def synth(
    config: str,
    parent_run_id: str,
    documents: str,
    cpt_dataset: dsl.Output[dsl.Dataset],
    heldout_dataset: dsl.Output[dsl.Dataset],
    sft_dataset: dsl.Output[dsl.Dataset],
    dpo_dataset: dsl.Output[dsl.Dataset],
    golden_dataset: dsl.Output[dsl.Dataset],
    unanswerable_dataset: dsl.Output[dsl.Dataset],
    synth_report: dsl.Output[dsl.Markdown],
) -> NamedTuple("StageOutputs", refs=str):
    """Chunks -> QA, abstention and preference data, CPT text and its held-out part, golden and unanswerable eval sets.
    `documents`: the ingest component's references.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {
        "cpt_dataset": cpt_dataset,
        "heldout_dataset": heldout_dataset,
        "sft_dataset": sft_dataset,
        "dpo_dataset": dpo_dataset,
        "golden_dataset": golden_dataset,
        "unanswerable_dataset": unanswerable_dataset,
        "synth_report": synth_report,
    }
    return namedtuple("StageOutputs", ["refs"])(run_stage_component("synth", config, parent_run_id, typed, documents=documents))
