from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("dpo"), install_kfp_package=False)
def dpo(
    config: str,
    parent_run_id: str,
    datasets: str,
    model: str,
    aligned_model: dsl.Output[dsl.Model],
    training_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", refs=str):
    """Preference alignment on the synthetic pairs. `datasets`: synth's references; `model`: the SFT model's.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"aligned_model": aligned_model, "training_metrics": training_metrics}
    return namedtuple("StageOutputs", ["refs"])(
        run_stage_component("dpo", config, parent_run_id, typed, datasets=datasets, model=model)
    )
