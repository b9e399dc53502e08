from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("page_merge"), install_kfp_package=False)
def page_merge(
    config: str,
    parent_run_id: str,
    model: str,
    pages: str,
    merged_model: dsl.Output[dsl.Model],
    merge_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", refs=str):
    """The page adapter folded into the full-precision VLM, checked against the adapter model on validation pages.
    `model`: the page_sft component's references; `pages`: the pages component's.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"merged_model": merged_model, "merge_metrics": merge_metrics}
    return namedtuple("StageOutputs", ["refs"])(
        run_stage_component("page_merge", config, parent_run_id, typed, model=model, pages=pages)
    )
