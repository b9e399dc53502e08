from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("dpo"), install_kfp_package=False)
def dpo(config: str, parent_run_id: str, synth: str, sft: str) -> str:
    """Preference alignment of the SFT model on the synthetic preference pairs; returns the model reference."""
    from doctune.stages import run_stage_component

    return run_stage_component("dpo", config, parent_run_id, synth=synth, sft=sft)
