from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(config: str, parent_run_id: str) -> str:
    """PDFs -> cleaned pages and chunks; returns the output references as JSON."""
    from doctune.stages import run_stage_component

    return run_stage_component("ingest", config, parent_run_id)
