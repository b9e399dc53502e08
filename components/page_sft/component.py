from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("page_sft"), install_kfp_package=False)
def page_sft(
    config: str,
    parent_run_id: str,
    pages: str,
    tuned_model: dsl.Output[dsl.Model],
    training_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", refs=str):
    """LoRA/QLoRA SFT of the vision-language model (model.base_model) on the training pages, the loss on the assistant
    JSON only. `pages`: the pages component's references.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"tuned_model": tuned_model, "training_metrics": training_metrics}
    return namedtuple("StageOutputs", ["refs"])(run_stage_component("page_sft", config, parent_run_id, typed, pages=pages))
