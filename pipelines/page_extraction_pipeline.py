"""The page-extraction DAG (`task: page_extraction`). Compile with `doctune compile`; the IR YAML beside this file must
stay in step."""

from pathlib import Path

from kfp import dsl

from doctune.config import ClusterConfig, RunConfig
from doctune_kfp.components.close_run.component import close_run
from doctune_kfp.components.open_run.component import open_run
from doctune_kfp.components.page_gate.component import page_gate
from doctune_kfp.components.page_merge.component import page_merge
from doctune_kfp.components.page_quantize.component import page_quantize
from doctune_kfp.components.page_sft.component import page_sft
from doctune_kfp.components.pages.component import pages
from doctune_kfp.components.promote.component import promote
from doctune_kfp.components.record_rejection.component import record_rejection
from doctune_kfp.pipelines.cluster import compile_for_cluster
from doctune_kfp.pipelines.placement import place

IR_YAML = Path(__file__).with_name("page_extraction_pipeline.yaml")
DESCRIPTION = "Rendered PDF pages to strict JSON with a tuned, quantized VLM, promoted only when it beats the champion."


def build_pipeline(cluster: ClusterConfig):
    """The DAG with `cluster`'s settings on every task (see pipelines.placement)."""

    @dsl.pipeline(name="doctune-page-extraction", description=DESCRIPTION)
    def page_extraction_pipeline(config: str = "", parent_run_id: str = ""):
        """config: the run YAML (empty: built-in defaults); parent_run_id: an MLflow run to adopt (empty: create one)."""
        closing = place(
            close_run(config=config, parent_run_id=parent_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
            "close_run",
            cluster,
        )
        with dsl.ExitHandler(closing, name="page-extraction-run"):
            opened = open_run(config=config, parent_run_id=parent_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            place(opened, "open_run", cluster).set_caching_options(False)  # a new pipeline run gets its own parent run
            parent = opened.output
            rendered = pages(config=config, parent_run_id=parent)
            place(rendered, "pages", cluster).set_display_name("render + label pages")
            labelled = rendered.outputs["refs"]
            tuned = page_sft(config=config, parent_run_id=parent, pages=labelled)
            place(tuned, "page_sft", cluster).set_display_name("VLM SFT")
            merged = page_merge(config=config, parent_run_id=parent, model=tuned.outputs["refs"], pages=labelled)
            place(merged, "page_merge", cluster).set_display_name("merge")
            quantized = page_quantize(config=config, parent_run_id=parent, model=merged.outputs["refs"], pages=labelled)
            place(quantized, "page_quantize", cluster).set_display_name("quantize")
            gate = page_gate(
                config=config,
                parent_run_id=parent,
                model=merged.outputs["refs"],
                quantized=quantized.outputs["refs"],
                pages=labelled,
            )
            place(gate, "page_gate", cluster).set_display_name("page gate")
            gate.set_caching_options(False)  # it reads the registry's champion, which is not a task input
            # No deploy step, unlike the doctune DAG: the page model is served through a KServe example config, not
            # the text track's `doctune serve` that the deploy component points the InferenceService at.
            with dsl.If(gate.outputs["decision"] == "promote", name="gate-passed"):
                promoted = promote(config=config, parent_run_id=parent, version=gate.outputs["version"])
                place(promoted, "promote", cluster).set_caching_options(False).set_display_name("promote: champion")
            with dsl.Else(name="gate-failed"):
                rejected = record_rejection(
                    config=config, parent_run_id=parent, version=gate.outputs["version"], failed=gate.outputs["failed"]
                )
                place(rejected, "record_rejection", cluster).set_caching_options(False).set_display_name("record rejection")

    return page_extraction_pipeline


def arguments(config: RunConfig) -> dict:
    """The DAG's parameters besides config and parent_run_id: none (nothing in this DAG is switched off)."""
    return {}


# The DAG with the default cluster settings: what kfp.local runs and what pipelines/page_extraction_pipeline.yaml holds.
page_extraction_pipeline = build_pipeline(ClusterConfig())


def compile_pipeline(path: Path = IR_YAML, cluster: ClusterConfig | None = None) -> Path:
    """Write the IR YAML; with `cluster`, its settings and image registry/tag (default: the defaults)."""
    return compile_for_cluster(build_pipeline(cluster) if cluster else page_extraction_pipeline, path, cluster or ClusterConfig())
