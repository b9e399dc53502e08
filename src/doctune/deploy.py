"""`doctune deploy`: the registry's champion (or a given version) served on the cluster by a KServe InferenceService.

The registry says what should serve; this points the InferenceService (doctune.cluster.inference_service) at it:
the version's GGUF variant (serve.variant), checked against its digest, its digest and version as annotations. With
deploy.server doctune (the default) the predictor is `doctune serve --version N` reading the pipeline pods' run config
from a ConfigMap and logging where the next run's synth reads; with llama-cpp it is llama.cpp's server on the folder
KServe's storage initializer copies. The pipeline's deploy step runs it after promote, and `doctune promote` /
`doctune rollback` after moving the alias, when deploy.enabled is on.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from doctune.artifacts import MANIFEST_NAME, ArtifactRef
from doctune.cluster import inference_service, kube
from doctune.config import RunConfig, config_from_yaml
from doctune.gate import registry
from doctune.tracking import TAG, Tracker

# URI schemes KServe's default storage initializer downloads (ClusterStorageContainer "default", and pvc://).
KSERVE_SCHEMES = ("s3://", "gs://", "pvc://", "hdfs://", "webhdfs://", "https://", "http://", "hf://", "oci://")


class DeployError(RuntimeError):
    """Nothing to deploy, or a version that cannot be served by the InferenceService; the message says why."""


@dataclass(frozen=True)
class Deployed:
    namespace: str
    name: str
    version: str
    previous: str | None  # the version the service served before, None when it was created
    url: str | None


def storage_uri(source: str, mapping: dict[str, str]) -> str:
    """The artifact URI as KServe's storage initializer reads it: the longest matching prefix of deploy.storage_uri_map
    replaced."""
    for prefix in sorted(mapping, key=len, reverse=True):
        if source.startswith(prefix):
            source = mapping[prefix] + source[len(prefix) :]
            break
    if not source.startswith(KSERVE_SCHEMES):
        raise DeployError(
            f"the variant's artifact URI {source} is not one KServe's storage initializer reads "
            f"({', '.join(KSERVE_SCHEMES)}): map its prefix in deploy.storage_uri_map, e.g. "
            "{'mlflow-artifacts:/': 's3://<bucket>/mlflow/'} for the MLflow server of manifests/base/mlflow"
        )
    return source


def _version(tracker: Tracker, version: str | None):
    name = registry.model_name(tracker)
    if version is None:
        found = registry.version_by_alias(tracker, registry.CHAMPION)
        if found is None:
            raise DeployError(
                f"registered model {name!r} in {tracker.uri} has no champion yet: nothing to deploy (a pipeline run "
                "whose candidate passes the gate promotes one, or `doctune promote VERSION`)"
            )
        return found
    try:
        return tracker.client.get_model_version(name, version)
    except MlflowException:
        raise DeployError(f"registered model {name!r} has no version {version}") from None


def _gguf_file(tracker: Tracker, ref: ArtifactRef, what: str) -> str:
    """The .gguf inside the variant folder, after checking the store's copy against the digest (manifest, every file
    present with its size; promotion already checked every byte)."""
    tracker.verify_stored(ref)
    with tempfile.TemporaryDirectory(prefix="doctune-deploy-") as tmp:
        local = tracker.client.download_artifacts(ref.run_id, f"{ref.artifact_path}/{MANIFEST_NAME}", tmp)
        files = [entry["path"] for entry in json.loads(Path(local).read_text())["files"] if entry["path"].endswith(".gguf")]
    if not files:
        raise DeployError(f"{what} holds no GGUF file: llama-server serves GGUF files; set serve.variant to a gguf-* variant")
    if len(files) > 1:
        raise DeployError(f"{what} holds {len(files)} .gguf files; llama-server loads one")
    return files[0]


def served_model(tracker: Tracker, config: RunConfig, version: str | None = None) -> inference_service.ServedModel:
    """The champion's (or `version`'s) serve.variant, located in the artifact store and checked; with deploy.server
    llama-cpp, the URI KServe's storage initializer reads it at."""
    found = _version(tracker, version)
    variants, variant = registry.variants_of(found, config.serve.variant)
    if variant not in variants:
        have = ", ".join(sorted(variants)) or "none"
        raise DeployError(f"version {found.version} has no variant {variant!r} (it has: {have}); set serve.variant")
    ref = ArtifactRef.from_dict(variants[variant])
    what = f"variant {variant!r} of version {found.version}"
    source = f"{tracker.client.get_run(ref.run_id).info.artifact_uri.rstrip('/')}/{ref.artifact_path}"
    return inference_service.ServedModel(
        registered_model=registry.model_name(tracker),
        version=str(found.version),
        variant=variant,
        gguf_file=_gguf_file(tracker, ref, what),
        storage_uri=storage_uri(source, config.deploy.storage_uri_map) if config.deploy.server == "llama-cpp" else None,
        digest=ref.digest,
        source_uri=source,
    )


def deploy(
    config: RunConfig,
    version: str | None = None,
    tracker: Tracker | None = None,
    report: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Deployed:
    """Point the InferenceService at the champion (or `version`): create it, or patch it in place, and wait until the
    new revision is ready. Raises DeployError, ConfigError or kube.KubernetesError, each one line."""
    if config.task != "documents":
        raise DeployError(
            f"doctune deploy serves the documents track's chat models, not task {config.task}: serve the page-extraction "
            "champion as in manifests/examples/page-extraction-inferenceservice.yaml"
        )
    settings = config.deploy
    # The doctune predictor's config, checked before anything is read or sent: the pods must reach MLflow and log on
    # the cache volume.
    served = inference_service.pod_config(config) if settings.server == "doctune" else config
    tracker = tracker or Tracker(config)
    model = served_model(tracker, config, version)
    namespace = kube.namespace(settings.namespace, "deploy.namespace")
    configmap = inference_service.config_map(served, namespace) if settings.server == "doctune" else None
    name = configmap["metadata"]["name"] if configmap else None
    desired = inference_service.manifest(served, namespace, model, name)
    obj, previous = inference_service.apply(settings, desired, report, configmap)
    url = (obj.get("status") or {}).get("url")
    return Deployed(namespace, settings.name, model.version, previous, url)


def deploy_component(config_yaml: str, parent_run_id: str, version: str) -> None:
    """The pipeline's deploy step, after promote: the InferenceService serves the version just promoted."""
    config = config_from_yaml(config_yaml)
    if not config.deploy.enabled:
        print("deploy.enabled is false: no InferenceService was changed (turn it on, with the deploy section's cluster "
              "settings, to serve the champion on the cluster)", flush=True)  # fmt: skip
        return
    tracker = Tracker(config)
    done = deploy(config, version=version, tracker=tracker)
    tracker.client.set_tag(parent_run_id, f"{TAG}deployed", f"{done.namespace}/{done.name} version {done.version}")
