from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("cpt"), install_kfp_package=False)
def cpt(config: str, parent_run_id: str, synth: str) -> str:
    """Domain continued pre-training on the synthetic CPT text; returns the model reference as JSON."""
    from doctune.stages import run_stage_component

    return run_stage_component("cpt", config, parent_run_id, synth=synth)
