"""`doctune deploy`: the registry's champion served by a KServe InferenceService, against the in-process Kubernetes API
emulator in tests/kube_api.py (no Kubernetes API server or KServe can run here) and a real MLflow registry. With
deploy.server doctune: `doctune serve --version N` with the pipeline pods' config from a ConfigMap, logging on the
cache volume where synth reads, the pin moved in place by the next promotion. With llama-cpp: created with the
champion's storage URI and digest, patched in place by the next promotion, moved back by a rollback. Every failure
one line."""

from __future__ import annotations

import json
import time

import kube_api
import pytest
from kube_api import KubeApi, serving_blocked

from conftest import free_port
from doctune import flywheel
from doctune.artifacts import GGUF_KIND, MODEL_KIND, ArtifactRef
from doctune.cluster import for_cluster
from doctune.cluster.kube import KubernetesError
from doctune.config import ConfigError
from doctune.deploy import DeployError, deploy
from doctune.gate import registry
from doctune.tracking import Tracker
from doctune_kfp.components.deploy.component import deploy as deploy_task
from doctune_kfp.components.promote.component import promote as promote_task
from doctune_kfp.pipelines.cli import main

SERVICE = ("inferenceservices", "serving", "doctune")
BUCKET = "s3://doctune-artifacts/mlflow/"
MLFLOW = "http://mlflow.serving.svc.cluster.local:5000"  # where the predictor pods reach MLflow
MOUNT = "/var/cache/doctune"  # cluster.cache_volume.mount_path


def register_version(tracker: Tracker, config, name: str) -> tuple[str, str]:
    """A registry version as a pipeline run leaves one: a merged model and its gguf-q8_0 variant logged by a stage run,
    registered by the gate's registry code. Returns (version, pipeline run). The GGUF is a few bytes: nothing loads
    it here (tests/test_serve.py serves a real one)."""
    work = config.project.workdir / name
    model, variant = work / "model", work / "gguf-q8_0"
    model.mkdir(parents=True)
    variant.mkdir()
    (model / "config.json").write_text(json.dumps({"name": name}))
    (variant / "model-q8_0.gguf").write_bytes(b"GGUF" + name.encode())
    parent = tracker.open_pipeline_run(name)
    run = tracker.start_stage_run("quantize", parent, {})
    refs = {
        "model": run.log_output("model", model, kind=MODEL_KIND),
        "gguf-q8_0": run.log_output("gguf-q8_0", variant, kind=GGUF_KIND),
    }
    run.finish(refs)
    return registry.register_candidate(tracker, refs["model"], {"gguf-q8_0": refs["gguf-q8_0"]}, {}), parent


def variant_of(tracker: Tracker, version: str) -> ArtifactRef:
    found = tracker.client.get_model_version(registry.model_name(tracker), version)
    return ArtifactRef.from_dict(json.loads(found.tags[registry.VARIANTS_TAG])["gguf-q8_0"])


def on_cluster(make_config, api_server: str, **settings):
    """The run config of a cluster: the PDFs on the cache volume, the predictor pods reaching MLflow at MLFLOW (here
    the local store stands in for it), and an artifact store the storage initializer reads at BUCKET (the local
    store's artifact folder stands in for the MLflow server's --artifacts-destination)."""
    root = (make_config().project.workdir / "artifacts").as_uri() + "/"
    return make_config(f"{MOUNT}/corpus", **{
        "deploy.enabled": True, "deploy.api_server": api_server, "deploy.namespace": "serving", "deploy.poll_s": 0.05,
        "deploy.ready_timeout_s": 10, "deploy.storage_uri_map": json.dumps({root: BUCKET}), "deploy.tracking_uri": MLFLOW,
        **settings,
    })  # fmt: skip


def served(isvc: dict) -> tuple[str, str, str]:
    """(version annotation, digest annotation, STORAGE_URI) of the service."""
    annotations = isvc["metadata"]["annotations"]
    (env,) = isvc["spec"]["predictor"]["containers"][0]["env"]
    return annotations["doctune.ai/model-version"], annotations["doctune.ai/artifact-digest"], env["value"]


def expected(tracker: Tracker, version: str) -> tuple[str, str, str]:
    ref = variant_of(tracker, version)
    return version, ref.digest, f"{BUCKET}{ref.run_id}/artifacts/gguf-q8_0"


def test_deploy_creates_the_service_a_promotion_patches_it_and_rollback_moves_it_back(make_config, tmp_path, capsys):
    with KubeApi() as kube:
        config = on_cluster(make_config, kube.url, **{"deploy.server": "llama-cpp"})
        tracker = Tracker(config)
        first, _ = register_version(tracker, config, "first")
        registry.promote(tracker, first, reason="first champion")

        done = deploy(config, tracker=tracker)
        isvc = kube.objects[SERVICE]
        assert served(isvc) == expected(tracker, first)
        assert isvc["spec"]["predictor"]["containers"][0]["args"][:2] == ["--model", "/mnt/models/model-q8_0.gguf"]
        assert (done.version, done.previous, done.url) == (first, None, "http://doctune.serving.example.com")
        assert [method for method, _ in kube.requests][:2] == ["GET", "POST"]  # not there yet: created
        uid = isvc["metadata"]["uid"]

        # The pipeline's gate-passed branch, its components' functions as their KFP tasks call them: promote, then
        # the deploy step patches the same service.
        second, parent = register_version(tracker, config, "second")
        promote_task.python_func(config=config.to_yaml(), parent_run_id=parent, version=second)
        deploy_task.python_func(config=config.to_yaml(), parent_run_id=parent, version=second)
        isvc = kube.objects[SERVICE]
        assert served(isvc) == expected(tracker, second)
        assert isvc["metadata"]["uid"] == uid and isvc["metadata"]["generation"] == 2  # patched, not recreated
        assert [method for method, _ in kube.requests].count("POST") == 1
        assert kube.content_types == ["application/merge-patch+json"]
        assert tracker.client.get_run(parent).data.tags["doctune.deployed"] == f"serving/doctune version {second}"
        assert f"InferenceService serving/doctune: patched, version {first} -> {second}" in capsys.readouterr().out
        # A rerun of the unchanged pipeline: the same spec, so no new revision, and nothing to wait for.
        deploy_task.python_func(config=config.to_yaml(), parent_run_id=parent, version=second)
        assert kube.objects[SERVICE]["metadata"]["generation"] == 2
        assert f"patched, version {second} -> {second}" in capsys.readouterr().out

        # A human rolls back: the registry and then the service go back to the first version.
        run_yaml = tmp_path / "run.yaml"
        run_yaml.write_text(config.to_yaml())
        assert main(["rollback", "--config", str(run_yaml), "--reason", "drill"]) == 0
        out = capsys.readouterr().out
        assert f"champion -> version {first} (version {second} rolled back)" in out
        assert f"patched, version {second} -> {first}" in out and "ready at http://doctune.serving.example.com" in out
        isvc = kube.objects[SERVICE]
        assert served(isvc) == expected(tracker, first)
        assert isvc["metadata"]["uid"] == uid and isvc["metadata"]["generation"] == 3
        assert not [key for key in kube.objects if key[0] == "configmaps"]  # llama-cpp reads no run config


def pod_sees(kube: KubeApi, tmp_path, monkeypatch) -> tuple[dict, object]:
    """(the predictor's container, the run config `doctune serve` starts with in its pod): the kubelet's part done
    here (the ConfigMap's keys as files where the container mounts it), the container's command run through the real
    CLI up to the server, which is not started (tests/test_serve.py serves a real model)."""
    from doctune import serve
    from doctune_kfp.pipelines.cli import main as cli

    predictor = kube.objects[SERVICE]["spec"]["predictor"]
    (container,) = predictor["containers"]
    (volume,) = [v for v in predictor["volumes"] if "configMap" in v]
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"]]
    local = tmp_path / volume["configMap"]["name"]
    local.mkdir(exist_ok=True)
    for key, text in kube.configmap_data("serving", volume["configMap"]["name"]).items():
        (local / key).write_text(text)
    seen = []

    def server(config):
        seen.append(config)
        raise serve.ServeError("not started in this test")

    monkeypatch.setattr(serve, "Server", server)
    command = [str(local) + arg[len(mount) :] if arg.startswith(mount + "/") else arg for arg in container["command"]]
    assert command[:2] == ["doctune", "serve"]
    assert cli(command[1:]) == 2 and len(seen) == 1
    return container, seen[0]


def test_the_doctune_server_pins_the_version_logs_where_synth_reads_and_a_promotion_moves_the_pin(
    make_config, tmp_path, capsys, monkeypatch
):
    with KubeApi() as kube:
        config = on_cluster(make_config, kube.url)  # deploy.server doctune: the default
        assert config.deploy.server == "doctune"
        tracker = Tracker(config)
        first, _ = register_version(tracker, config, "first")
        registry.promote(tracker, first, reason="first champion")

        done = deploy(config, tracker=tracker)
        assert (done.version, done.previous, done.url) == (first, None, "http://doctune.serving.example.com")
        isvc = kube.objects[SERVICE]
        uid, annotations = isvc["metadata"]["uid"], isvc["metadata"]["annotations"]
        assert annotations["doctune.ai/model-version"] == first
        assert annotations["doctune.ai/artifact-digest"] == variant_of(tracker, first).digest
        container, pod = pod_sees(kube, tmp_path, monkeypatch)
        assert container["image"].rsplit("/", 1)[-1].startswith("doctune-cpu:")  # the components' image
        assert "STORAGE_URI" not in {e["name"] for e in container["env"]}  # doctune serve fetches and verifies
        assert (pod.serve.version, pod.serve.variant, pod.serve.host, pod.serve.port) == (first, "gguf-q8_0", "0.0.0.0", 8080)
        assert pod.tracking_uri == MLFLOW  # deploy.tracking_uri: the registry as the pods reach it
        # The logs lie on the cache volume, in the folder the pipeline's synth reads: flywheel.log_dir of the
        # config its pods get (doctune.cluster.for_cluster, at submit).
        pipeline = for_cluster(config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": MLFLOW})}))
        assert pod.serve.log_dir == flywheel.log_dir(pipeline) == flywheel.log_dir(pod)
        assert str(pod.serve.log_dir).startswith(f"{MOUNT}/") and pod.project.workdir == pipeline.project.workdir
        predictor = isvc["spec"]["predictor"]
        volume = config.cluster.cache_volume
        assert {"name": "cache", "persistentVolumeClaim": {"claimName": volume.name}} in predictor["volumes"]
        assert {"name": "cache", "mountPath": MOUNT} in container["volumeMounts"]
        # The cluster's Secrets as environment variables, as every pipeline pod gets them (pipelines/placement.py).
        from_secrets = {(e["name"], e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"],
                         e["valueFrom"]["secretKeyRef"]["optional"]) for e in container["env"] if "valueFrom" in e}  # fmt: skip
        assert from_secrets == {(variable, secret.secret, key, secret.optional)
                                for secret in config.cluster.secrets for key, variable in secret.env.items()}  # fmt: skip
        assert {"MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= {name for name, *_ in from_secrets}
        configmaps = [key for key in kube.objects if key[0] == "configmaps"]
        assert len(configmaps) == 1

        # The pipeline's gate-passed branch: promote, then the deploy step moves the pin in place. The config did
        # not change, so neither did its ConfigMap.
        second, parent = register_version(tracker, config, "second")
        promote_task.python_func(config=config.to_yaml(), parent_run_id=parent, version=second)
        deploy_task.python_func(config=config.to_yaml(), parent_run_id=parent, version=second)
        isvc = kube.objects[SERVICE]
        assert isvc["metadata"]["uid"] == uid and isvc["metadata"]["generation"] == 2  # patched, not recreated
        assert isvc["metadata"]["annotations"]["doctune.ai/model-version"] == second
        container, pod = pod_sees(kube, tmp_path, monkeypatch)
        command = container["command"]
        assert command[command.index("--version") + 1] == second and pod.serve.version == second
        assert [key for key in kube.objects if key[0] == "configmaps"] == configmaps and kube.deleted == []
        assert f"patched, version {first} -> {second}" in capsys.readouterr().out

        # A changed config is a new ConfigMap and a new revision; the old one goes once the new one serves.
        changed = config.model_copy(update={"retrieval": config.retrieval.model_copy(update={"top_k": 7})})
        deploy(changed, tracker=tracker)
        container, pod = pod_sees(kube, tmp_path, monkeypatch)
        assert pod.retrieval.top_k == 7 and pod.serve.version == second
        assert kube.deleted == configmaps and len([key for key in kube.objects if key[0] == "configmaps"]) == 1
        assert "of the previous revision deleted" in capsys.readouterr().out

        # To llama-cpp and back: the other server's fields go with the patch (no volume naming a deleted ConfigMap).
        lean = changed.model_copy(update={"deploy": changed.deploy.model_copy(update={"server": "llama-cpp"})})
        deploy(lean, tracker=tracker)
        predictor = kube.objects[SERVICE]["spec"]["predictor"]
        assert "volumes" not in predictor and served(kube.objects[SERVICE]) == expected(tracker, second)
        assert not [key for key in kube.objects if key[0] == "configmaps"]
        deploy(changed, tracker=tracker)
        assert (
            kube.objects[SERVICE]["metadata"]["uid"] == uid and pod_sees(kube, tmp_path, monkeypatch)[1].serve.version == second
        )


def test_no_champion_and_an_unreachable_api_are_one_line_each(make_config, tmp_path, capsys):
    config = on_cluster(make_config, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(config.to_yaml())
    assert main(["deploy", "--config", str(run_yaml)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no champion yet: nothing to deploy" in err

    tracker = Tracker(config)
    first, _ = register_version(tracker, config, "first")
    registry.promote(tracker, first, reason="first champion")
    assert main(["deploy", "--config", str(run_yaml)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert (
        err.startswith(f"error: the Kubernetes API at {config.deploy.api_server} does not answer (")
        and "deploy.api_server" in err
    )
    assert main(["deploy", "--config", str(run_yaml), "--version", "9"]) == 2
    assert "has no version 9" in capsys.readouterr().err


def test_a_revision_that_cannot_load_and_a_cluster_without_kserve_are_named(make_config, monkeypatch):
    with KubeApi() as kube:
        config = on_cluster(make_config, kube.url)
        tracker = Tracker(config)
        first, _ = register_version(tracker, config, "first")
        registry.promote(tracker, first, reason="first champion")
        deploy(config, tracker=tracker)
        kube.serving = serving_blocked("ModelLoadFailed", "llama_model_load: error loading model")
        second, _ = register_version(tracker, config, "second")
        registry.promote(tracker, second, reason="second champion")
        with pytest.raises(KubernetesError) as error:
            deploy(config, tracker=tracker)
        reason = "BlockedByFailedLoad: ModelLoadFailed llama_model_load: error loading model"
        assert f"InferenceService serving/doctune: the new revision does not come up ({reason}); version {first} keeps " \
               "serving (kubectl -n serving describe inferenceservices doctune)" == str(error.value)  # fmt: skip
        monkeypatch.setattr(kube_api, "CUSTOM", kube_api.TRAINING_JOBS)  # an API server without KServe's CRDs
        with pytest.raises(KubernetesError, match=r"has no serving\.kserve\.io/v1beta1 inferenceservices: install KServe"):
            deploy(config, tracker=tracker)


def test_nothing_reaches_the_cluster_when_deploy_is_off_or_the_store_is_not_one_kserve_reads(make_config, capsys):
    with KubeApi() as kube:
        config = on_cluster(make_config, kube.url, **{"deploy.server": "llama-cpp", "deploy.storage_uri_map": "{}"})
        tracker = Tracker(config)
        first, parent = register_version(tracker, config, "first")
        registry.promote(tracker, first, reason="first champion")
        with pytest.raises(DeployError, match=r"is not one KServe's storage initializer reads .*deploy\.storage_uri_map"):
            deploy(config, tracker=tracker)
        # The doctune server, where its pods could not reach MLflow or would log where synth does not read.
        for settings, message in [
            ({"deploy.tracking_uri": "null", "tracking.uri": "http://127.0.0.1:5000"},
             r"tracking\.uri http://127\.0\.0\.1:5000 is on this machine \(a port-forward\?\).*set deploy\.tracking_uri"),
            ({"deploy.tracking_uri": "null"}, r"tracking\.uri is 'sqlite:///.*set it to the MLflow server"),
            ({"cluster.cache_volume.kind": "ephemeral"}, r"cluster\.cache_volume\.kind is 'ephemeral'.*set it to 'pvc'"),
            ({"serve.log_dir": "/srv/serving"},
             rf"/srv/serving \(flywheel\.log_dir, .*\) is not on the cache volume the pods mount at {MOUNT}"),
        ]:  # fmt: skip
            with pytest.raises(ConfigError, match=message):
                deploy(on_cluster(make_config, kube.url, **settings), tracker=tracker)
        with pytest.raises(ConfigError, match=r"deploy\.replicas 2 with deploy\.server doctune: replicas would append to one"):
            on_cluster(make_config, kube.url, **{"deploy.replicas": 2})
        off = config.model_copy(update={"deploy": config.deploy.model_copy(update={"enabled": False})})
        deploy_task.python_func(config=off.to_yaml(), parent_run_id=parent, version=first)
        assert "deploy.enabled is false: no InferenceService was changed" in capsys.readouterr().out
        assert kube.requests == []


def test_the_emulator_replaces_and_merge_patches_inferenceservices_as_the_api_server_does():
    """What the tests above rely on: uid kept, generation bumped by spec changes only, status kept, stale replaces
    refused, JSON merge patch semantics (null removes), the strategic merge patch refused for a custom resource."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with KubeApi() as kube:
        configuration = client.Configuration()
        configuration.host = kube.url
        custom = client.CustomObjectsApi(client.ApiClient(configuration))
        call = {"group": "serving.kserve.io", "version": "v1beta1", "namespace": "serving", "plural": "inferenceservices"}
        body = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                "metadata": {"name": "doctune", "annotations": {"a": "1", "b": "2"}},
                "spec": {"predictor": {"minReplicas": 1}}}  # fmt: skip
        created = custom.create_namespaced_custom_object(body=body, **call)
        deadline = time.monotonic() + 10
        while "status" not in kube.objects[SERVICE] and time.monotonic() < deadline:  # the controller's thread
            time.sleep(0.01)
        patched = custom.patch_namespaced_custom_object(name="doctune", body={"metadata": {"annotations": {"a": None}}}, **call)
        assert patched["metadata"]["annotations"] == {"b": "2"} and patched["metadata"]["generation"] == 1
        stale = {**body, "metadata": {**body["metadata"], "resourceVersion": created["metadata"]["resourceVersion"]}}
        with pytest.raises(ApiException) as conflict:
            custom.replace_namespaced_custom_object(name="doctune", body=stale, **call)
        assert conflict.value.status == 409
        current = {**body, "metadata": {**body["metadata"], "resourceVersion": patched["metadata"]["resourceVersion"]},
                   "spec": {"predictor": {"minReplicas": 2}}}  # fmt: skip
        replaced = custom.replace_namespaced_custom_object(name="doctune", body=current, **call)
        assert replaced["metadata"]["uid"] == created["metadata"]["uid"] and replaced["metadata"]["generation"] == 2
        assert replaced["status"]["conditions"]  # a replace does not touch the status subresource
        with pytest.raises(ApiException) as refused:
            custom.api_client.call_api(
                "/apis/serving.kserve.io/v1beta1/namespaces/serving/inferenceservices/doctune", "PATCH",
                header_params={"Content-Type": "application/strategic-merge-patch+json"}, body={"spec": {}},
            )  # fmt: skip
        assert refused.value.status == 415


@pytest.mark.parametrize(
    ("status", "generation", "stale", "current"),
    [
        ({"observedGeneration": 2}, 3, None, False),  # a controller that reports what it has seen, behind
        ({"observedGeneration": 3}, 3, "r-00002", True),
        ({"components": {"predictor": {"latestCreatedRevision": "r-00002"}}}, 3, "r-00002", False),  # KServe: not yet
        ({"components": {"predictor": {"latestCreatedRevision": "r-00003"}}}, 3, "r-00002", True),
        ({}, 3, None, True),  # raw deployment mode: nothing to tell, taken as it is
    ],
)
def test_a_ready_status_counts_once_it_speaks_of_the_spec_just_written(status, generation, stale, current):
    from doctune.cluster.inference_service import _status_is_current

    assert _status_is_current({"metadata": {"generation": generation}, "status": status}, stale) is current
