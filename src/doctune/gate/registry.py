"""The MLflow Model Registry side of the gate: candidate versions and the aliases that say what serves.

One registered model per project (`project.name`). `challenger` is the latest candidate, `champion` what serves,
`previous-champion` the rollback target. The champion history (a registered-model tag) makes rollback a pop, and
every move is recorded as an MLflow run of kind `registry` (action, versions, who, why).
"""

from __future__ import annotations

import getpass
import json

from mlflow.exceptions import MlflowException

from doctune.artifacts import ArtifactRef
from doctune.tracking import TAG, Tracker

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
HISTORY_TAG = f"{TAG}champion_history"
MODEL_TAG = f"{TAG}model_ref"
VARIANTS_TAG = f"{TAG}variant_refs"
# The replies the abstention threshold was scored on: JSON {language: sentence}. Versions registered before carry
# one English sentence under LEGACY_ABSTENTION_SENTENCE_TAG.
ABSTENTION_SENTENCES_TAG = f"{TAG}abstention_sentences"
LEGACY_ABSTENTION_SENTENCE_TAG = f"{TAG}abstention_sentence"
ABSTENTION_THRESHOLD_TAG = f"{TAG}abstention_threshold"  # + ".<variant>": the gate's threshold for that variant
RETRIEVAL_TAG = f"{TAG}retrieval_refs"  # {chunks, index, model}: what `doctune serve` retrieves with
GATED_AGAINST_TAG = f"{TAG}gated_against"  # the champion's model digest when the version was judged ("none")
PASSAGE_LABELS_TAG = f"{TAG}passage_labels"  # "true": trained and gated on `[n] <title>, p. X` passages; else bare
TASK_TAG = f"{TAG}task"  # documents or page_extraction (the run config's task); untagged versions are documents


GATED = "gated"  # serve.variant: the first variant the gate held to its rules


def variants_of(version, requested: str) -> tuple[dict[str, dict], str]:
    """A registry version's variant refs (name -> ArtifactRef dict, in the gate's order) and the name `requested`
    stands for: `gated` is the first of them where the version has one."""
    variants = json.loads(version.tags.get(VARIANTS_TAG, "{}"))
    return variants, next(iter(variants), requested) if requested == GATED else requested


class RegistryError(RuntimeError):
    """A registry action that cannot be done (no such version, nothing to roll back to)."""


def model_name(tracker: Tracker) -> str:
    return tracker.config.project.name


def _ensure_model(tracker: Tracker) -> str:
    name = model_name(tracker)
    try:
        tracker.client.get_registered_model(name)
    except MlflowException:
        try:
            tracker.client.create_registered_model(name, description="doctune candidates; the gate moves the aliases")
        except MlflowException:
            tracker.client.get_registered_model(name)  # created concurrently
    return name


def version_by_alias(tracker: Tracker, alias: str):
    try:
        return tracker.client.get_model_version_by_alias(model_name(tracker), alias)
    except MlflowException:
        return None


def champion(tracker: Tracker) -> tuple[str, ArtifactRef] | None:
    """(version, merged model reference) of the current champion, or None before the first promotion. A champion of
    the other track (a chat model where the run extracts pages, or the reverse) is an error naming the fix: the two
    tracks' models cannot be compared, and one must not replace the other in serving."""
    version = version_by_alias(tracker, CHAMPION)
    if version is None:
        return None
    task = version.tags.get(TASK_TAG, "documents")
    if task != tracker.config.task:
        raise RegistryError(
            f"registered model {model_name(tracker)!r}: its champion, version {version.version}, is a {task} model, and "
            f"this run's task is {tracker.config.task}; give each track a registered model of its own with project.name "
            "(the page-extraction profile uses doctune-pages)"
        )
    return str(version.version), ArtifactRef.from_dict(json.loads(version.tags[MODEL_TAG]))


def champion_key(tracker: Tracker, candidate: ArtifactRef) -> str:
    """What a gate result depends on besides its inputs: the champion it was judged against. When the candidate is
    the champion already (a rerun of the run that promoted it), the key is the one it was judged under, so the rerun
    reuses that result."""
    current = champion(tracker)
    if current is not None and current[1].digest == candidate.digest:
        return gated_against(tracker, current[0])
    return current[1].digest if current else "none"


def gated_against(tracker: Tracker, version: str) -> str:
    return tracker.client.get_model_version(model_name(tracker), version).tags.get(GATED_AGAINST_TAG, "unknown")


def register_candidate(tracker: Tracker, model: ArtifactRef, variants: dict[str, ArtifactRef], tags: dict[str, str]) -> str:
    """A new version for the merged model (its variants and lineage in tags), aliased `challenger`. The weights are
    checked byte for byte in the store first: a registry version never points at corrupted weights."""
    for ref in (model, *variants.values()):
        tracker.verify_stored(ref, full=True)
    name = _ensure_model(tracker)
    version = tracker.client.create_model_version(
        name,
        source=f"runs:/{model.run_id}/{model.artifact_path}",
        run_id=model.run_id,
        tags={
            MODEL_TAG: json.dumps(model.to_dict()),
            TASK_TAG: tracker.config.task,
            VARIANTS_TAG: json.dumps({k: v.to_dict() for k, v in variants.items()}),
            **tags,
        },
        description=f"merged model {model.digest}",
    )
    tracker.client.set_registered_model_alias(name, CHALLENGER, version.version)
    return str(version.version)


def verify_weights(tracker: Tracker, version) -> None:
    """Every byte of a version's merged model and quantized variants, as the store holds them now."""
    refs = [ArtifactRef.from_dict(json.loads(version.tags[MODEL_TAG]))]
    refs += [ArtifactRef.from_dict(v) for v in json.loads(version.tags.get(VARIANTS_TAG, "{}")).values()]
    for ref in refs:
        tracker.verify_stored(ref, full=True)


def _history(tracker: Tracker) -> list[str]:
    name = model_name(tracker)
    try:
        tags = tracker.client.get_registered_model(name).tags
    except MlflowException:
        raise RegistryError(
            f"there is no registered model {name!r} in {tracker.uri} yet: nothing to roll back (a pipeline run that "
            "passes the gate registers and promotes one)"
        ) from None
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _record(tracker: Tracker, action: str, version: str, previous: str | None, reason: str) -> None:
    run = tracker.client.create_run(
        tracker.experiment_id,
        run_name=f"{action}-v{version}",
        tags={f"{TAG}kind": "registry", f"{TAG}action": action, f"{TAG}version": version,
              f"{TAG}previous_champion": previous or "", f"{TAG}actor": getpass.getuser(), f"{TAG}reason": reason[:4000]},
    )  # fmt: skip
    tracker.client.set_terminated(run.info.run_id, "FINISHED")


def promote(tracker: Tracker, version: str, reason: str) -> str | None:
    """`champion` -> version, the old champion -> `previous-champion`; returns the old champion's version."""
    name = _ensure_model(tracker)
    try:
        found = tracker.client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}") from None
    verify_weights(tracker, found)
    old = version_by_alias(tracker, CHAMPION)
    previous = str(old.version) if old is not None else None
    if previous == version:
        raise RegistryError(f"version {version} of {name!r} is already the champion")
    history = [*_history(tracker), version]
    tracker.client.set_registered_model_alias(name, CHAMPION, version)
    if previous is not None:
        tracker.client.set_registered_model_alias(name, PREVIOUS, previous)
    tracker.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    tracker.client.set_model_version_tag(name, version, f"{TAG}promoted", reason[:4000])
    _record(tracker, "promote", version, previous, reason)
    return previous


def reject(tracker: Tracker, version: str, failed_rules: list[str]) -> None:
    """Leave `champion` alone; the version says which rules it failed."""
    name = model_name(tracker)
    tracker.client.set_model_version_tag(name, version, f"{TAG}rejected", "; ".join(failed_rules)[:4000] or "rejected")
    champ = version_by_alias(tracker, CHAMPION)
    _record(tracker, "reject", version, str(champ.version) if champ else None, "; ".join(failed_rules))


def rollback(tracker: Tracker, reason: str = "rollback") -> tuple[str, str]:
    """Make the previous champion the champion again; returns (demoted version, restored version)."""
    name = model_name(tracker)
    history = _history(tracker)
    current = version_by_alias(tracker, CHAMPION)
    if current is None or len(history) < 2:
        raise RegistryError(f"registered model {name!r} has no previous champion to roll back to")
    history.pop()
    restored = history[-1]
    verify_weights(tracker, tracker.client.get_model_version(name, restored))
    tracker.client.set_registered_model_alias(name, CHAMPION, restored)
    if len(history) >= 2:
        tracker.client.set_registered_model_alias(name, PREVIOUS, history[-2])
    else:
        tracker.client.delete_registered_model_alias(name, PREVIOUS)
    tracker.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    tracker.client.set_model_version_tag(name, current.version, f"{TAG}rolled_back", reason[:4000])
    _record(tracker, "rollback", restored, str(current.version), reason)
    return str(current.version), restored
