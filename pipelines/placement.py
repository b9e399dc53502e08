"""Cluster settings of each task (kfp-kubernetes): resources, GPU pool, cache volume, secrets, retries, caching.

Applied while the pipeline is built, so they land in the compiled IR; kfp.local ignores them.
"""

from kfp import dsl, kubernetes

from doctune.config import ClusterConfig

CACHE_VOLUME = "doctune-cache"
IMAGE_UID = 10001


def place(task: dsl.PipelineTask, component: str, cluster: ClusterConfig) -> dsl.PipelineTask:
    """Settings for the task of `component` (a stage name, or a bookkeeping component such as open_run)."""
    resources = cluster.resources.get(component, cluster.bookkeeping)
    task.set_cpu_request(resources.cpu).set_memory_request(resources.memory)
    task.set_cpu_limit(resources.cpu_limit or resources.cpu).set_memory_limit(resources.memory_limit or resources.memory)
    if component in cluster.gpu.stages:
        task.set_accelerator_type(cluster.gpu.accelerator_type).set_accelerator_limit(cluster.gpu.count)
        for label, value in cluster.gpu.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in cluster.gpu.tolerations:
            kubernetes.add_toleration(
                task, key=toleration.key, operator=toleration.operator, value=toleration.value, effect=toleration.effect
            )
    volume = cluster.cache_volume
    if volume.kind == "pvc":
        kubernetes.mount_pvc(task, pvc_name=volume.name, mount_path=volume.mount_path)
    else:
        kubernetes.add_ephemeral_volume(
            task,
            volume_name=CACHE_VOLUME,
            mount_path=volume.mount_path,
            access_modes=["ReadWriteOnce"],
            size=volume.size,
            storage_class_name=volume.storage_class,
        )
    for secret in cluster.secrets:
        kubernetes.use_secret_as_env(
            task, secret_name=secret.secret, secret_key_to_env=dict(secret.env), optional=secret.optional
        )
    # The images' user (images/*/Dockerfile); KFP adds no privilege escalation, all capabilities dropped.
    kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "doctune")
    kubernetes.add_pod_label(task, "app.kubernetes.io/component", component.replace("_", "-"))
    if cluster.retries:
        task.set_retry(num_retries=cluster.retries, backoff_duration=cluster.retry_backoff, backoff_factor=2.0)
    task.set_caching_options(cluster.caching)
    return task
