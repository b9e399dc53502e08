"""Compile for a cluster: the DAG (or one stage's rerun) with the run config's `cluster` settings and images."""

from pathlib import Path

import yaml
from kfp import compiler, dsl

from doctune import __version__
from doctune.config import ClusterConfig
from doctune_kfp.components.images import retag
from doctune_kfp.components.rerun_stage.component import rerun_stage_component
from doctune_kfp.pipelines.placement import place


def compile_for_cluster(pipeline_func, path: Path, cluster: ClusterConfig) -> Path:
    """Compile `pipeline_func` to `path`, with doctune's images moved to cluster.image_registry/image_tag."""
    compiler.Compiler().compile(pipeline_func, str(path))
    documents = list(yaml.safe_load_all(Path(path).read_text()))
    tag = cluster.image_tag or __version__
    executors = documents[0]["deploymentSpec"]["executors"]
    changed = False
    for executor in executors.values():
        container = executor.get("container", {})
        if "image" in container and (new := retag(container["image"], cluster.image_registry, tag)) != container["image"]:
            container["image"], changed = new, True
    if changed:
        Path(path).write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return Path(path)


def build_rerun_pipeline(stage: str, cluster: ClusterConfig):
    """A one-component pipeline: `stage` rerun on its inputs recorded in an earlier pipeline run."""
    component = rerun_stage_component(stage)

    @dsl.pipeline(name=f"doctune-rerun-{stage.replace('_', '-')}", description=f"Rerun {stage} on an earlier run's inputs.")
    def rerun(config: str = "", from_run: str = ""):
        task = component(config=config, stage=stage, from_run=from_run)
        # Never served from KFP's cache: a rerun exists to produce a new stage run.
        place(task, stage, cluster).set_caching_options(False).set_display_name(f"rerun {stage}")

    return rerun


def compile_rerun(stage: str, cluster: ClusterConfig, path: Path) -> Path:
    return compile_for_cluster(build_rerun_pipeline(stage, cluster), path, cluster)
