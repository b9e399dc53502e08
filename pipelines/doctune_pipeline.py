"""The doctune DAG. Compile with `doctune compile`; the IR YAML beside this file must stay in step."""

from pathlib import Path

from kfp import dsl

from doctune.config import ClusterConfig, RunConfig
from doctune_kfp.components.close_run.component import close_run
from doctune_kfp.components.cpt.component import cpt
from doctune_kfp.components.deploy.component import deploy
from doctune_kfp.components.dpo.component import dpo
from doctune_kfp.components.eval_gate.component import eval_gate
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.merge.component import merge
from doctune_kfp.components.open_run.component import open_run
from doctune_kfp.components.promote.component import promote
from doctune_kfp.components.quantize.component import quantize
from doctune_kfp.components.record_rejection.component import record_rejection
from doctune_kfp.components.retriever.component import retriever
from doctune_kfp.components.sft.component import sft
from doctune_kfp.components.skip_stage.component import skip_stage
from doctune_kfp.components.synth.component import synth
from doctune_kfp.pipelines.cluster import compile_for_cluster
from doctune_kfp.pipelines.placement import place

IR_YAML = Path(__file__).with_name("doctune_pipeline.yaml")
DESCRIPTION = "PDFs to a tuned, aligned, quantized LLM, promoted only when it beats the champion."


def build_pipeline(cluster: ClusterConfig):
    """The DAG with `cluster`'s settings on every task (see pipelines.placement)."""

    @dsl.pipeline(name="doctune", description=DESCRIPTION)
    def doctune_pipeline(
        config: str = "",
        parent_run_id: str = "",
        cpt_enabled: bool = True,
        dpo_enabled: bool = True,
        retriever_enabled: bool = True,
    ):
        """config: the run YAML (empty: built-in defaults); parent_run_id: an MLflow run to adopt (empty: create one);
        cpt_enabled: run domain continued pre-training (off: SFT starts from the base model);
        dpo_enabled: align the SFT model on the preference pairs (off: the SFT model goes on);
        retriever_enabled: tune the embedding model on the corpus (off: the gate compares the base embedder with BM25)."""
        closing = place(
            close_run(config=config, parent_run_id=parent_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
            "close_run",
            cluster,
        )
        with dsl.ExitHandler(closing, name="doctune-run"):
            opened = open_run(config=config, parent_run_id=parent_run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            place(opened, "open_run", cluster).set_caching_options(False)  # a new pipeline run gets its own parent run
            parent = opened.output
            ingested = ingest(config=config, parent_run_id=parent)
            place(ingested, "ingest", cluster).set_display_name("ingest + chunk")
            documents = ingested.outputs["refs"]
            data = synth(config=config, parent_run_id=parent, documents=documents)
            place(data, "synth", cluster).set_display_name("synthetic data")
            datasets = data.outputs["refs"]
            with dsl.If(retriever_enabled == True, name="retriever-on"):  # noqa: E712
                tuned_retriever = retriever(config=config, parent_run_id=parent, datasets=datasets, documents=documents)
                place(tuned_retriever, "retriever", cluster).set_display_name("retriever")
            with dsl.Else(name="retriever-off"):
                no_retriever = skip_stage(config=config, parent_run_id=parent, stage="retriever", passthrough="{}")
                place(no_retriever, "skip_stage", cluster).set_display_name("retriever off")
            retrieval = dsl.OneOf(tuned_retriever.outputs["refs"], no_retriever.output)
            with dsl.If(cpt_enabled == True, name="cpt-on"):  # noqa: E712 (a KFP condition, not a Python comparison)
                adapted = place(cpt(config=config, parent_run_id=parent, datasets=datasets), "cpt", cluster)
                adapted.set_display_name("domain CPT")
            with dsl.Else(name="cpt-off"):
                no_cpt = skip_stage(config=config, parent_run_id=parent, stage="cpt", passthrough="{}")
                place(no_cpt, "skip_stage", cluster).set_display_name("CPT off")
            start_model = dsl.OneOf(adapted.outputs["refs"], no_cpt.output)
            tuned = sft(config=config, parent_run_id=parent, datasets=datasets, model=start_model)
            place(tuned, "sft", cluster).set_display_name("instruction SFT")
            with dsl.If(dpo_enabled == True, name="dpo-on"):  # noqa: E712
                aligned = dpo(config=config, parent_run_id=parent, datasets=datasets, model=tuned.outputs["refs"])
                place(aligned, "dpo", cluster).set_display_name("DPO")
            with dsl.Else(name="dpo-off"):
                no_dpo = skip_stage(config=config, parent_run_id=parent, stage="dpo", passthrough=tuned.outputs["refs"])
                place(no_dpo, "skip_stage", cluster).set_display_name("DPO off")
            final_model = dsl.OneOf(aligned.outputs["refs"], no_dpo.output)
            merged = merge(config=config, parent_run_id=parent, model=final_model)
            place(merged, "merge", cluster).set_display_name("merge")
            quantized = quantize(config=config, parent_run_id=parent, model=merged.outputs["refs"], datasets=datasets)
            place(quantized, "quantize", cluster).set_display_name("quantize")
            gate = eval_gate(
                config=config,
                parent_run_id=parent,
                model=merged.outputs["refs"],
                quantized=quantized.outputs["refs"],
                datasets=datasets,
                documents=documents,
                retriever=retrieval,
            )
            place(gate, "eval_gate", cluster).set_display_name("eval gate")
            gate.set_caching_options(False)  # it reads the registry's champion, which is not a task input
            with dsl.If(gate.outputs["decision"] == "promote", name="gate-passed"):
                promoted = promote(config=config, parent_run_id=parent, version=gate.outputs["version"])
                place(promoted, "promote", cluster).set_caching_options(False).set_display_name("promote: champion")
                # The cluster's InferenceService follows the registry: after the alias moved, never before.
                deployed = deploy(config=config, parent_run_id=parent, version=gate.outputs["version"]).after(promoted)
                place(deployed, "deploy", cluster).set_caching_options(False).set_display_name("deploy: InferenceService")
            with dsl.Else(name="gate-failed"):
                rejected = record_rejection(
                    config=config, parent_run_id=parent, version=gate.outputs["version"], failed=gate.outputs["failed"]
                )
                place(rejected, "record_rejection", cluster).set_caching_options(False).set_display_name("record rejection")

    return doctune_pipeline


def arguments(config: RunConfig) -> dict:
    """The DAG's parameters besides config and parent_run_id: the stages the run config switches off."""
    return {"cpt_enabled": config.cpt.enabled, "dpo_enabled": config.dpo.enabled, "retriever_enabled": config.retriever.enabled}


# The DAG with the default cluster settings: what kfp.local runs and what pipelines/doctune_pipeline.yaml holds.
doctune_pipeline = build_pipeline(ClusterConfig())


def compile_pipeline(path: Path = IR_YAML, cluster: ClusterConfig | None = None) -> Path:
    """Write the IR YAML; with `cluster`, its settings and image registry/tag (default: the defaults)."""
    return compile_for_cluster(build_pipeline(cluster) if cluster else doctune_pipeline, path, cluster or ClusterConfig())
