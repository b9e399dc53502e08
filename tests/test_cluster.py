"""The pipeline on a cluster: kfp-kubernetes settings in the compiled IR, and submit/schedule/runs/rerun against a
KFP v2beta1 API server on 127.0.0.1 (tests/kfp_api.py; no Kubeflow cluster can run here)."""

from __future__ import annotations

import time

import pytest
import yaml
from kfp_api import KfpApi

from doctune.config import ClusterConfig, ConfigError, build_config
from doctune_kfp.pipelines.cli import main
from doctune_kfp.pipelines.doctune_pipeline import compile_pipeline

STAGES = ("ingest", "synth", "retriever", "cpt", "sft", "dpo", "merge", "quantize", "eval-gate")
GPU_STAGES = ("cpt", "sft", "dpo", "merge", "quantize")


def compiled(tmp_path, cluster: ClusterConfig | None = None) -> tuple[dict, dict]:
    ir, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "ir.yaml", cluster).read_text())
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(ir: dict) -> dict:
    """Every task of the DAG, nested ones (conditions, exit handler) included."""
    found = {}
    for component in [ir["root"], *ir["components"].values()]:
        found |= component.get("dag", {}).get("tasks", {})
    return found


def test_compiled_ir_places_training_on_the_gpu_pool_with_caches_secrets_retries_and_caching(tmp_path):
    ir, platform = compiled(tmp_path)
    executors = ir["deploymentSpec"]["executors"]
    for stage in STAGES:
        container, pod = executors[f"exec-{stage}"]["container"], platform[f"exec-{stage}"]
        assert container["resources"]["resourceCpuRequest"] and container["resources"]["resourceMemoryLimit"]
        assert pod["pvcMount"][0]["mountPath"] == "/var/cache/doctune"
        assert {s["secretName"] for s in pod["secretAsEnv"]} == {"doctune-mlflow", "doctune-object-store", "doctune-teacher"}
        on_gpu = stage in GPU_STAGES
        assert ("accelerator" in container["resources"]) == on_gpu, stage
        assert ("nodeSelector" in pod) == on_gpu and ("tolerations" in pod) == on_gpu, stage
        assert container["image"].split("/")[-1].startswith("doctune-cuda:" if on_gpu else "doctune-cpu:"), stage
    sft = executors["exec-sft"]["container"]["resources"]
    assert sft["accelerator"]["resourceType"] == "nvidia.com/gpu" and sft["accelerator"]["resourceCount"] == "1"
    assert platform["exec-sft"]["nodeSelector"]["labels"] == {"doctune.io/pool": "gpu"}
    assert platform["exec-sft"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    all_tasks = tasks(ir)
    for stage in STAGES:
        assert all_tasks[stage]["retryPolicy"]["maxRetryCount"] == 2
    for stage in ("ingest", "synth", "retriever", "cpt", "sft", "dpo", "merge", "quantize"):
        assert all_tasks[stage]["cachingOptions"] == {"enableCache": True}, stage
    # These read or move state that is not a task input: never served from the cache.
    for name in ("open-run", "eval-gate", "promote", "deploy", "record-rejection"):
        assert not all_tasks[name]["cachingOptions"].get("enableCache"), name
    # Secrets reach pods only as environment variables: the pipeline takes no credential parameter.
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {
        "config",
        "parent_run_id",
        "cpt_enabled",
        "dpo_enabled",
        "retriever_enabled",
    }


def test_cluster_settings_come_from_the_config(tmp_path):
    cluster = build_config({"cluster": {
        "image_registry": "registry.example.com:5000/ml", "image_tag": "2026.11.1",
        "gpu": {"accelerator_type": "amd.com/gpu", "count": 4, "stages": ["sft"],
                "node_selector": {"cloud.google.com/gke-nodepool": "a100"}},
        "cache_volume": {"kind": "ephemeral", "size": "300Gi", "storage_class": "premium-rwo"},
        "resources": {"sft": {"cpu": "16", "memory": "120Gi", "memory_limit": "128Gi"}},
        "retries": 0, "caching": False,
    }}).cluster  # fmt: skip
    ir, platform = compiled(tmp_path, cluster)
    executors = ir["deploymentSpec"]["executors"]
    assert executors["exec-sft"]["container"]["image"] == "registry.example.com:5000/ml/doctune-cuda:2026.11.1"
    assert executors["exec-ingest"]["container"]["image"] == "registry.example.com:5000/ml/doctune-cpu:2026.11.1"
    sft = executors["exec-sft"]["container"]["resources"]
    assert sft["accelerator"]["resourceType"] == "amd.com/gpu" and sft["accelerator"]["resourceCount"] == "4"
    assert sft["resourceMemoryRequest"] == "120Gi" and sft["resourceMemoryLimit"] == "128Gi"
    assert "accelerator" not in executors["exec-dpo"]["container"]["resources"]
    assert platform["exec-sft"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "a100"}
    volume = platform["exec-sft"]["genericEphemeralVolume"][0]
    assert volume["size"] == "300Gi" and volume["storageClassName"] == "premium-rwo"
    assert "retryPolicy" not in tasks(ir)["sft"] and not tasks(ir)["sft"]["cachingOptions"].get("enableCache")


def test_unknown_component_in_cluster_resources_is_named():
    with pytest.raises(ConfigError, match=r"cluster\.resources.*unknown components \['sfft'\]"):
        build_config({"cluster": {"resources": {"sfft": {"cpu": "1"}}}})
    with pytest.raises(ConfigError, match=r"cluster\.resources\.sft\.memory"):
        build_config({"cluster": {"resources": {"sft": {"memory": "lots"}}}})


# -- users' commands against a KFP API server -----------------------------------


@pytest.fixture
def run_yaml(tmp_path):
    """A run config as a platform team writes it for the cluster."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "project": {"name": "handbook"},
        "tracking": {"uri": "http://mlflow.doctune.svc:5000"},
        "ingest": {"pdfs": "/var/cache/doctune/corpus/handbook"},
        "dpo": {"enabled": False},
        "cluster": {"experiment": "handbook-tuning", "image_tag": "0.1.0-test"},
    }))  # fmt: skip
    return path


def test_submit_uploads_the_compiled_pipeline_with_the_run_config_and_prints_the_run_url(run_yaml, capsys):
    with KfpApi() as api:
        assert main(["submit", "--host", api.url, "--config", str(run_yaml), "--name", "handbook-manual"]) == 0
        (request,) = api.sent("POST", "/runs")
    body = request["body"]
    assert body["display_name"] == "handbook-manual" and body["service_account"] == "doctune-pipeline"
    assert body["experiment_id"] in api.experiments
    assert api.experiments[body["experiment_id"]]["display_name"] == "handbook-tuning"
    spec = body["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "doctune"
    images = {e["container"]["image"] for e in spec["pipeline_spec"]["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/doctune/doctune-cpu:0.1.0-test", "ghcr.io/doctune/doctune-cuda:0.1.0-test"}
    assert "exec-sft" in spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    params = body["runtime_config"]["parameters"]
    assert params["dpo_enabled"] is False and params["cpt_enabled"] is True and params["parent_run_id"] == ""
    assert params["retriever_enabled"] is True
    config = yaml.safe_load(params["config"])
    assert config["tracking"]["uri"] == "http://mlflow.doctune.svc:5000"
    assert config["project"]["workdir"] == "/var/cache/doctune/workdir/handbook"  # on the volume every pod mounts
    run_id = next(iter(api.runs))
    assert capsys.readouterr().out.splitlines() == [f"submitted KFP run {run_id}", f"{api.url}/#/runs/details/{run_id}"]


def test_schedule_creates_a_weekly_run_one_at_a_time_without_catch_up(run_yaml, capsys):
    with KfpApi() as api:
        assert main(["schedule", "--host", api.url, "--config", str(run_yaml), "--cron", "0 3 * * 1"]) == 0
        (request,) = api.sent("POST", "/recurringruns")
    body = request["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"  # KFP's cron has seconds first
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["display_name"] == "handbook-retrain"
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "doctune"
    assert yaml.safe_load(body["runtime_config"]["parameters"]["config"])["project"]["name"] == "handbook"
    assert "created recurring run" in capsys.readouterr().out


def test_runs_lists_the_experiments_runs_newest_first(run_yaml, capsys):
    with KfpApi() as api:
        for name in ("first", "second"):
            assert main(["submit", "--host", api.url, "--config", str(run_yaml), "--name", name]) == 0
            time.sleep(1.1)  # created_at has second resolution
        capsys.readouterr()
        assert main(["runs", "--host", api.url, "--config", str(run_yaml)]) == 0
        (listing,) = api.sent("GET", "/runs")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "name", "state"]
    assert [line.split()[1] for line in lines[2:]] == ["second", "first"]
    assert all(line.split()[2] == "PENDING" for line in lines[2:])
    assert listing["query"]["sort_by"] == ["created_at desc"]


def test_stage_submit_reruns_one_component_on_an_earlier_runs_inputs(run_yaml, capsys):
    with KfpApi() as api:
        code = main(["stage", "sft", "--from-run", "0123abcd", "--submit", "--host", api.url, "--config", str(run_yaml),
                     "--set", "sft.learning_rate=1e-4"])  # fmt: skip
        (request,) = api.sent("POST", "/runs")
    assert code == 0
    spec = request["body"]["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "doctune-rerun-sft"
    assert list(spec["deploymentSpec"]["executors"]) == ["exec-rerun-stage"]
    assert spec["deploymentSpec"]["executors"]["exec-rerun-stage"]["container"]["image"].endswith("doctune-cuda:0.1.0-test")
    params = request["body"]["runtime_config"]["parameters"]
    assert params["from_run"] == "0123abcd" and yaml.safe_load(params["config"])["sft"]["learning_rate"] == 1e-4
    platform = request["body"]["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]
    assert platform["executors"]["exec-rerun-stage"]["nodeSelector"]["labels"] == {"doctune.io/pool": "gpu"}
    assert "submitted rerun of sft" in capsys.readouterr().out


def test_connection_and_auth_errors_are_explained(run_yaml, capsys, monkeypatch):
    from conftest import free_port

    started = time.monotonic()
    assert main(["submit", "--host", f"http://127.0.0.1:{free_port()}", "--config", str(run_yaml)]) == 1
    assert time.monotonic() - started < 20  # no half-minute of kfp.Client retries
    err = capsys.readouterr().err
    assert "cannot reach KFP at http://127.0.0.1:" in err and "port-forward" in err and "Traceback" not in err

    with KfpApi(token="s3cret") as api:
        monkeypatch.delenv("DOCTUNE_KFP_TOKEN", raising=False)
        assert main(["runs", "--host", api.url, "--config", str(run_yaml)]) == 1
        assert "refused the request (HTTP 401): set DOCTUNE_KFP_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("DOCTUNE_KFP_TOKEN", "s3cret")
        assert main(["submit", "--host", api.url, "--config", str(run_yaml)]) == 0
        assert api.sent("POST", "/runs")[0]["headers"]["authorization"] == "Bearer s3cret"

    assert main(["submit", "--config", str(run_yaml)]) == 1
    assert "no KFP endpoint: pass --host URL or set cluster.host" in capsys.readouterr().err


def test_a_config_that_only_works_on_this_machine_is_refused_before_anything_is_sent(tmp_path, run_yaml, capsys):
    with KfpApi() as api:
        assert main(["submit", "--host", api.url, "--config", str(run_yaml), "--set", "tracking.uri=null"]) == 2
        assert "tracking.uri is 'sqlite:///" in capsys.readouterr().err
        assert main(["submit", "--host", api.url, "--config", str(run_yaml), "--set", f"ingest.pdfs={tmp_path}"]) == 2
        assert "not on the cache volume that pods mount at /var/cache/doctune" in capsys.readouterr().err
        assert main(["schedule", "--host", api.url, "--config", str(run_yaml), "--cron", "every monday"]) == 1
        assert "expected 5 fields" in capsys.readouterr().err
        assert api.requests == []
