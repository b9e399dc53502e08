from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("merge"), install_kfp_package=False)
def merge(
    config: str,
    parent_run_id: str,
    model: str,
    merged_model: dsl.Output[dsl.Model],
    merge_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", refs=str):
    """The final adapter folded into full-precision base weights, checked against the adapter model by logits.
    `model`: the DPO model's references or, with DPO off, the SFT model's handed on.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"merged_model": merged_model, "merge_metrics": merge_metrics}
    return namedtuple("StageOutputs", ["refs"])(run_stage_component("merge", config, parent_run_id, typed, model=model))
