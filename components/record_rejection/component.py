from kfp import dsl

from doctune_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def record_rejection(config: str, parent_run_id: str, version: str, failed: str):
    """The gate failed: `champion` stays; the candidate version is tagged with the rules it failed."""
    from doctune.stages import reject_component

    reject_component(config, parent_run_id, version, failed)
