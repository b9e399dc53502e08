from kfp import dsl

from doctune_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy(config: str, parent_run_id: str, version: str):
    """After promote: the cluster's KServe InferenceService serves the promoted version (deploy.enabled; else a no-op)."""
    from doctune.deploy import deploy_component

    deploy_component(config, parent_run_id, version)
