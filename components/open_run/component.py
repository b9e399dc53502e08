from kfp import dsl

from doctune_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def open_run(config: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Open (or adopt) the MLflow parent run of this pipeline run; returns its id."""
    from doctune.stages import open_pipeline_run

    return open_pipeline_run(config, parent_run_id, kfp_run_id)
