from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("synth"), install_kfp_package=False)
def synth(config: str, parent_run_id: str, ingest: str) -> str:
    """Chunks -> QA, abstention and preference data, CPT text, golden and unanswerable eval sets."""
    from doctune.stages import run_stage_component

    return run_stage_component("synth", config, parent_run_id, ingest=ingest)
