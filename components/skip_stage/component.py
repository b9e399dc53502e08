from kfp import dsl

from doctune_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def skip_stage(config: str, parent_run_id: str, stage: str, passthrough: str) -> str:
    """The Else branch of a switched-off stage: record the skip; hand `passthrough` references downstream."""
    from doctune.stages import skip_stage_component

    return skip_stage_component(stage, config, parent_run_id, passthrough)
