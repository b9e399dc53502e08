from kfp import dsl

from doctune_kfp.components.images import image_for


def rerun_stage(config: str, stage: str, from_run: str) -> str:
    """Rerun one stage with its inputs resolved from an earlier pipeline run; returns the new output references."""
    from doctune.stages import rerun_stage_component

    return rerun_stage_component(stage, config, from_run)


def rerun_stage_component(stage: str):
    """The component for `stage`, in the image that stage needs (CUDA for training, merge and quantize)."""
    return dsl.component(rerun_stage, base_image=image_for(stage), install_kfp_package=False)
