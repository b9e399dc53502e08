from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("cpt"), install_kfp_package=False)
def cpt(
    config: str,
    parent_run_id: str,
    datasets: str,
    adapted_model: dsl.Output[dsl.Model],
    training_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", refs=str):
    """Domain continued pre-training on the synthetic CPT text. `datasets`: the synth component's references.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"adapted_model": adapted_model, "training_metrics": training_metrics}
    return namedtuple("StageOutputs", ["refs"])(run_stage_component("cpt", config, parent_run_id, typed, datasets=datasets))
