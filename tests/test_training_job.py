"""Multi-node training jobs through the Kubernetes API, against the in-process emulator in tests/kube_api.py
(no Kubernetes API server can run here): the objects sent, success, failure with the job's reason, timeout."""

from __future__ import annotations

import sys

import pytest
from kube_api import KubeApi, scripted

from doctune.cluster.training_job import TrainingJobError, job_manifest, run_training_job
from doctune.config import build_config

ZERO3 = {"zero_optimization": {"stage": 3}}


def cluster(api_url: str, **training_job) -> dict:
    data = {"training_job": {"api_server": api_url, "namespace": "ml", "poll_s": 0.1, **training_job}}
    return build_config({"cluster": data}).cluster.model_dump(mode="json")


def test_pytorchjob_manifest_places_every_node_on_the_gpu_pool_as_non_root():
    manifest = job_manifest("doctune-sft-abc", "ml", cluster("http://unused"), ["python", "-m", "x"], nodes=4,
                            gpus_per_node=8, env={"A": "1"})  # fmt: skip
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["spec"]["nprocPerNode"] == "8"
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch" and container["image"].startswith("ghcr.io/doctune/doctune-cuda:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False}
    assert pod["nodeSelector"] == {"doctune.io/pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "deepspeed", "configMap": {"name": "doctune-sft-abc-deepspeed"}} in pod["volumes"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "doctune-model-cache"}} in pod["volumes"]
    env = {e["name"]: e for e in container["env"]}
    assert env["A"]["value"] == "1" and env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "doctune-mlflow"


def test_trainjob_runs_its_nodes_with_the_operators_rendezvous_variables(capsys):
    check = "import os; assert os.environ['PET_NNODES'] == '2' and os.environ['PET_NPROC_PER_NODE'] == '1'; " \
            "assert open(os.environ['DS']).read().startswith('{')"  # fmt: skip
    with KubeApi() as kube:
        settings = cluster(kube.url, kind="TrainJob")
        final = run_training_job("doctune-sft-t1", settings, ["python", "-c", check], nodes=2, gpus_per_node=1,
                                 deepspeed_config=ZERO3, env={"DS": "/etc/doctune/deepspeed/ds_config.json"})  # fmt: skip
    assert final["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and final["spec"]["trainer"]["numNodes"] == 2
    assert final["status"]["conditions"][-1]["type"] == "Complete"
    assert ("configmaps", "ml", "doctune-sft-t1-deepspeed") in kube.deleted
    assert "TrainJob ml/doctune-sft-t1: Complete" in capsys.readouterr().out


def test_a_failed_job_fails_the_stage_with_its_reason():
    failing = scripted((0.2, "Running", "JobRunning", ""), (0.2, "Failed", "OOMKilled", "Worker 1 ran out of memory"))
    with KubeApi(controller=failing) as kube, pytest.raises(TrainingJobError) as error:
        run_training_job("doctune-cpt-f1", cluster(kube.url), [sys.executable], nodes=2, gpus_per_node=1,
                         deepspeed_config=ZERO3)  # fmt: skip
    message = str(error.value)
    assert "PyTorchJob ml/doctune-cpt-f1 failed: OOMKilled: Worker 1 ran out of memory" in message
    assert "kubectl -n ml logs -l training.kubeflow.org/job-name=doctune-cpt-f1" in message
    assert ("configmaps", "ml", "doctune-cpt-f1-deepspeed") in kube.deleted


def test_a_job_past_its_timeout_is_deleted_and_named():
    with KubeApi(controller=scripted((0.1, "Running", "JobRunning", ""))) as kube, pytest.raises(TrainingJobError) as error:
        run_training_job("doctune-dpo-t2", cluster(kube.url, timeout_s=1.0), [sys.executable], nodes=2, gpus_per_node=1,
                         deepspeed_config=ZERO3)  # fmt: skip
    assert "did not finish within cluster.training_job.timeout_s=1s; deleted it" in str(error.value)
    assert ("pytorchjobs", "ml", "doctune-dpo-t2") in kube.deleted


def test_an_unreachable_or_refusing_api_is_named():
    with KubeApi() as kube:
        run_training_job("doctune-sft-dup", cluster(kube.url), [sys.executable, "-c", "pass"], nodes=2, gpus_per_node=1,
                         deepspeed_config=ZERO3)  # fmt: skip
        kube.objects[("configmaps", "ml", "doctune-sft-dup-deepspeed")] = {"data": {}}  # left over from a crashed run
        with pytest.raises(TrainingJobError, match=r"creating PyTorchJob ml/doctune-sft-dup failed: HTTP 409.*already exists"):
            run_training_job("doctune-sft-dup", cluster(kube.url), [sys.executable], nodes=2, gpus_per_node=1,
                             deepspeed_config=ZERO3)  # fmt: skip


def test_nodes_above_one_need_a_full_fine_tune():
    from doctune.config import ConfigError

    with pytest.raises(ConfigError, match=r"sft: .*nodes \(2\) > 1 needs method full"):
        build_config({"sft": {"nodes": 2, "method": "lora"}})
