from kfp import dsl

from doctune_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def close_run(config: str, parent_run_id: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: mark the MLflow parent run finished or failed, whatever happened inside."""
    from doctune.stages import close_pipeline_run

    close_pipeline_run(config, parent_run_id, kfp_run_id, status.state, status.error_message or "")
