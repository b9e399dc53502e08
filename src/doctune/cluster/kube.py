"""The Kubernetes API as doctune's cluster code reaches it: the client, the namespace, and failures as one line."""

from __future__ import annotations

import json
from pathlib import Path

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds of one API call: an API that never answers is named, not waited on


class KubernetesError(RuntimeError):
    """No Kubernetes API to talk to, or it refused a request; the message says which and why."""


def api_client(api_server: str | None, setting: str):
    """An ApiClient: `api_server` as given, else the pod's service account, else ~/.kube/config. `setting` names the
    config key that sets the server, for the message when there is none."""
    from kubernetes import client, config

    if api_server:
        configuration = client.Configuration()
        configuration.host = api_server
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError) as exc:
            raise KubernetesError(
                f"no Kubernetes API: not in a pod with a service account, no ~/.kube/config, and {setting} is unset ({exc})"
            ) from None
    return client.ApiClient()


def namespace(configured: str | None, setting: str) -> str:
    """The configured namespace, else the one of the pod this runs in."""
    if configured:
        return configured
    if NAMESPACE_FILE.is_file():
        return NAMESPACE_FILE.read_text().strip()
    raise KubernetesError(f"{setting} is unset and {NAMESPACE_FILE} does not exist (not in a pod)")


def host_of(api) -> str:
    return api.configuration.host


def unreachable(host: str, exc: Exception) -> str:
    """One line for an API that did not answer (urllib3's errors carry the whole retry history)."""
    reason = getattr(exc, "reason", None) or exc  # MaxRetryError wraps the last connection error
    text = next((arg for arg in reversed(reason.args) if isinstance(arg, str)), str(reason))
    cause = text.rsplit(": ", 1)[-1] or type(reason).__name__
    return f"the Kubernetes API at {host} does not answer ({cause})"


def api_message(exc) -> str:
    """The API server's own message of an ApiException."""
    try:
        return json.loads(exc.body).get("message", exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body)
