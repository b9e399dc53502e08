from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("ingest"), install_kfp_package=False)
def ingest(config: str, parent_run_id: str) -> str:
    """PDFs -> cleaned pages and chunks; returns the output references as JSON."""
    from doctune.stages import run_stage_component

    return run_stage_component("ingest", config, parent_run_id)
