from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("sft"), install_kfp_package=False)
def sft(config: str, parent_run_id: str, synth: str, cpt: str) -> str:
    """Instruction SFT on the synthetic chat data, from the CPT model (or the base model when `cpt` holds none)."""
    from doctune.stages import run_stage_component

    return run_stage_component("sft", config, parent_run_id, synth=synth, cpt=cpt)
