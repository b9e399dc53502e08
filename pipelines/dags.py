"""The DAG of each run-config task (`task:`): what `doctune run`, `compile`, `submit` and `schedule` build."""

from types import ModuleType

from doctune.config import RunConfig
from doctune.config.pages import PAGE_TASK
from doctune_kfp.pipelines import doctune_pipeline, page_extraction_pipeline

# task -> the module that wires its DAG; each defines build_pipeline(cluster), compile_pipeline(path, cluster), IR_YAML
# and arguments(config) (the DAG's parameters besides config and parent_run_id).
DAGS: dict[str, ModuleType] = {"documents": doctune_pipeline, PAGE_TASK: page_extraction_pipeline}


def dag_for(config: RunConfig) -> ModuleType:
    return DAGS[config.task]
