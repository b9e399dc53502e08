"""Faults a user makes or meets, and what they see: a config path that is a folder, a key written twice, a --set that
replaces a section, the training table after reused stages, a judge that drops every DPO pair."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from doctune.config import ConfigError, SynthConfig, load_config
from doctune.stages import execute_stage
from doctune.summary import summarize
from doctune.synth.build import build
from doctune.synth.extractive import extractive_questions
from doctune.synth.stage import SynthError, check_judged
from doctune.tracking import Tracker
from doctune_kfp.pipelines.cli import main

pytestmark = pytest.mark.faults


# -- the run config -------------------------------------------------------------------------------------------------


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"run config {tmp_path} is a folder, not a YAML file"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "run.yaml").write_text("extends: profiles\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "run.yaml")
    assert str(err.value) == f"{tmp_path / 'run.yaml'}: extends: {tmp_path / 'profiles'} is a folder, not a YAML file"
    (tmp_path / "run.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "run.yaml")
    assert str(err.value) == f"{tmp_path / 'run.yaml'}: extends: {tmp_path / 'gone.yaml'} does not exist"


def test_a_key_written_twice_names_the_key_path_the_file_and_both_lines(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("sft:\n  method: lora\n  learning_rate: 0.001\n  max_steps: 4\n  save_steps: 2\n\n\n\n  max_steps: 9\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"run config {path}: key sft.max_steps appears twice (lines 4 and 9)"
    # A whole section twice, and a key twice in a file that another one extends.
    path.write_text("sft:\n  max_steps: 4\ndpo: {}\nsft:\n  max_steps: 9\n")
    with pytest.raises(ConfigError, match=r"key sft appears twice \(lines 1 and 4\)"):
        load_config(path)
    (tmp_path / "base.yaml").write_text("gate:\n  rules:\n    alpha: 0.05\n    alpha: 0.1\n")
    (tmp_path / "run.yaml").write_text("extends: base.yaml\nsft: {max_steps: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "run.yaml")
    assert str(err.value) == f"run config {tmp_path / 'base.yaml'}: key gate.rules.alpha appears twice (lines 3 and 4)"
    # A YAML merge key may be overridden, as YAML intends: not a duplicate.
    path.write_text("sft: &steps {max_steps: 4, learning_rate: 0.001}\ndpo:\n  <<: *steps\n  max_steps: 6\n")
    assert load_config(path).dpo.max_steps == 6


def test_set_replacing_a_section_is_blamed_on_that_set(capsys):
    code = main(["stage", "ingest", "--set", "ingest=5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == ["error: invalid run config (defaults):"]
    assert "ingest: a section, but --set ingest=5 makes it the value 5; set one of its keys instead" in err
    # Any value that fails validation names its --set; reaching into a value names the --set that made it one.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["quantize.variants=[3]"])
    assert "quantize.variants.0: Input should be a valid string (got 3) (from --set quantize.variants=[3])" in str(err.value)
    with pytest.raises(ConfigError, match=r"'ingest.ocr=never': ingest is a value, not a section \(set by --set ingest=5\)"):
        load_config(None, ["ingest=5", "ingest.ocr=never"])


def test_an_invalid_value_in_the_file_is_not_blamed_on_a_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ingest: {workers: many}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["ingest.ocr=never"])
    assert "ingest.workers: Input should be a valid integer" in str(err.value) and "--set" not in str(err.value)


# -- the training table after reused stages -------------------------------------------------------------------------


def _sft_dataset(folder: Path) -> Path:
    answer = "It writes interface {i} to a stub file. It also checks the types of every argument."
    records = [
        {"messages": [{"role": "system", "content": "You answer."}, {"role": "user", "content": f"What does -x{i} do?"},
                      {"role": "assistant", "content": answer.format(i=i)}], "meta": {}}
        for i in range(12)
    ]  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[10:]))
    (folder / "system_prompt.txt").write_text("You answer.")
    return folder


def _pipeline_with_sft(tracker: Tracker, config, sft_ref=None):
    """A pipeline run whose synth stage hands on the SFT set (logged once, then the same reference), then SFT."""
    parent = tracker.open_pipeline_run("reuse-test")
    if sft_ref is None:
        run = tracker.start_stage_run("synth", parent, {})
        sft_ref = run.log_output("sft", _sft_dataset(config.project.workdir.parent / "sft-data"), kind="sft_dataset")
        run.finish({"sft": sft_ref})
    result = execute_stage("sft", config, tracker, parent, {"sft": sft_ref})
    tracker.close_pipeline_run(parent, succeeded=True)
    return parent, sft_ref, result


def _training_rows(summary: str) -> dict[str, list[str]]:
    """The training table of a summary: its first column -> the other cells."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage") and "tokens/s" in line)
    header = lines[start]
    columns = [header.index(name) for name in ("method", "steps", "loss first", "held-out", "tokens/s", "padding")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        bounds = [0, *columns, len(line)]
        cells = [line[a:b].strip() for a, b in itertools.pairwise(bounds)]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_training_table_of_a_reused_stage_shows_the_reused_runs_steps_and_speed(make_config):
    config = make_config(
        **{"sft.max_steps": 3, "sft.batch_size": 2, "sft.logging_steps": 1, "sft.eval_steps": 3, "sft.save_steps": 3}
    )
    tracker = Tracker(config)
    first_parent, sft_ref, first = _pipeline_with_sft(tracker, config)
    second_parent, _, second = _pipeline_with_sft(tracker, config, sft_ref)
    third_parent, _, third = _pipeline_with_sft(tracker, config, sft_ref)
    assert first.reused_from is None and second.reused_from == first.run_id and third.reused_from is not None

    original = _training_rows(summarize(tracker, first_parent))["sft"]
    method, steps, losses, _heldout, tokens_per_s, _padding = original
    assert method == "lora" and steps == "3" and "→" in losses and float(tokens_per_s) > 0
    for parent in (second_parent, third_parent):  # a reuse, and a reuse of a reuse
        summary = summarize(tracker, parent)
        assert _training_rows(summary) == {"sft (reused)": original}
        assert f"reused {first.run_id}" in summary or f"reused {second.run_id}" in summary


# -- a judge that drops every DPO pair ------------------------------------------------------------------------------


class _WordIndex:
    """A stand-in for ChunkIndex: hashed bag-of-words vectors, no embedding model."""

    def __init__(self, texts: list[str]):
        self.vectors = self.embed(texts)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def search(self, queries, k: int):
        vectors = self.embed(queries) if isinstance(queries, list) else queries
        scores = vectors @ self.vectors.T
        order = np.argsort(-scores, axis=1)[:, :k]
        return order, np.take_along_axis(scores, order, axis=1)


def _chunks(n: int) -> list[dict]:
    names = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet"]
    return [
        {
            "chunk_id": f"doc{i}-0001",
            "doc_id": f"doc{i}",
            "section": f"{i}.1 The {names[i % 10]} command",
            "text": (
                f"{i}.1 The {names[i % 10]} command\n\n"
                f"A {names[i % 10].lower()} table is a structure that stores {i + 3} records of the {names[(i + 3) % 10]} kind.\n"
                f"The {names[i % 10].lower()} command writes the table to the current file {i + 2} times.\n"
                f"Entries expire after {i * 7 + 11} seconds unless the {names[(i + 5) % 10]} flag is set.\n\n"
                "The following options are available:\n"
                f"-q{i} level -- set the level of detail for the {names[i % 10]} report.\n"
                f"-v{i} -- print every step of the {names[(i + 1) % 10]} run and quit.\n"
            ),
        }
        for i in range(n)
    ]


def test_a_judge_that_drops_every_dpo_pair_fails_the_stage_with_the_counts():
    config = SynthConfig(judge=True)
    chunks = _chunks(24)
    qas = [qa for chunk in chunks for qa in extractive_questions(chunk, limit=6)]
    index = _WordIndex([c["text"] for c in chunks])

    always_b = lambda question, a, b: "B"  # noqa: E731  (position bias: prefers the second answer in both orders)
    data = build(config, chunks, qas, index, 3, [], judge=always_b)
    pairs = data.counts["judge_train_pairs"]
    assert pairs > 0 and data.dpo["train"] == []
    with pytest.raises(SynthError) as err:
        check_judged(data)
    assert str(err.value) == (
        f"the pairwise judge kept 0 of {pairs} DPO pairs of the training split ({pairs} disagreed between orders, "
        "0 preferred the rejected answer); check the judge model (synth.endpoint) or set synth.judge=false"
    )

    plain = build(config, chunks, qas, index, 3, []).dpo["train"]
    shown = {(p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in plain}

    def prefers_rejected(question, a, b):  # consistent in both orders, and wrong: the rejected answer
        return "B" if (question, a, b) in shown else "A"

    data = build(config, chunks, qas, index, 3, [], judge=prefers_rejected)
    with pytest.raises(SynthError, match=rf"kept 0 of {pairs} DPO pairs .*\(0 disagreed between orders, {pairs} preferred"):
        check_judged(data)

    fair = build(config, chunks, qas, index, 3, [], judge=lambda q, a, b: "A" if (q, a, b) in shown else "B")
    check_judged(fair)  # a judge that keeps the pairs passes, and keeps them all
    assert len(fair.dpo["train"]) == len(plain) == pairs
