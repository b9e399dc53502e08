from kfp import dsl

from doctune_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def promote(config: str, parent_run_id: str, version: str):
    """The gate passed: `champion` moves to the candidate version, the old one becomes `previous-champion`."""
    from doctune.stages import promote_component

    promote_component(config, parent_run_id, version)
