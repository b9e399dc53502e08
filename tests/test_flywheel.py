"""The data flywheel and the gate's pairwise judge: served failures mined from the logs, a labeling queue in Label
Studio's format, labels read back, relabeled failures trained on (upsampled, with rated-up answers beside them, and
as DPO pairs), a production eval set that is never trained on; and the judge asked in both orders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_gate import scores
from test_synth import _Endpoint

from doctune import flywheel
from doctune.chat import rag_user_message
from doctune.config import JudgeConfig
from doctune.gate.evaluate import EvalSets
from doctune.gate.judge import judge
from doctune.gate.rules import decide
from doctune.serve import JsonlLog

SYSTEM = {"role": "system", "content": "You answer questions about the manual."}
PASSAGE = "To install a package, run apt install followed by the package name."


def _request(request_id: str, user: str, response: str, status: int = 200, **extra) -> dict:
    messages = [SYSTEM, {"role": "user", "content": user}]
    return {"request_id": request_id, "time": f"2026-11-20T10:00:{request_id[-1]}0+00:00", "model_version": "3",
            "messages": messages, "response": response, "status": status, **extra}  # fmt: skip


@pytest.fixture
def logs(make_config):
    """Served requests and feedback as `doctune serve` writes them, with a bad line, and labels in both formats."""
    config = make_config(**{"flywheel.production_fraction": 0.0})
    folder = config.project.workdir / "serving"
    requests, feedback = JsonlLog(folder / "requests.jsonl", 2**20, []), JsonlLog(folder / "feedback.jsonl", 2**20, [])
    rag = rag_user_message("How do I install a package?", [PASSAGE])
    requests.write(_request("r1", rag, "Reboot the computer twice, then wait."))  # ungrounded, corrected below
    requests.write(_request("r2", rag, "Run apt install followed by the package name."))  # rated up
    requests.write(_request("r3", "List the options as JSON.", "options: a, b", json_requested=True))  # invalid JSON
    requests.write(_request("r4", "Which port does the server use?", "Port 8080."))  # rated down, labeled below
    requests.write(_request("r5", "Hello?", "", status=502))  # a server error: not the model's answer
    with open(folder / "requests.jsonl", "a") as handle:
        handle.write("{not json\n")
    feedback.write({"request_id": "r1", "rating": "down", "correction": "Run apt install followed by the package name."})
    feedback.write({"request_id": "r2", "rating": "up"})
    feedback.write({"request_id": "r4", "rating": "down"})
    feedback.write({"request_id": "gone", "rating": "down"})
    labels = folder / "labels"
    labels.mkdir()
    export = [{"id": 7, "data": {"request_id": "r4"}, "annotations": [
        {"was_cancelled": True, "result": [{"from_name": "answer", "value": {"text": ["cancelled"]}}]},
        {"result": [{"from_name": "answer", "type": "textarea", "value": {"text": ["The server listens on port 8000."]}}]},
    ]}]  # fmt: skip
    (labels / "label-studio-export.json").write_text(json.dumps(export))
    (labels / "extra.jsonl").write_text(json.dumps({"request_id": "nowhere", "answer": "x"}) + "\n")
    return config


def test_failures_are_mined_queued_and_labels_read_back(logs):
    fly = flywheel.collect(logs)
    reasons = {f.request_id: f.reasons for f in fly.failures}
    assert reasons == {"r1": ["thumbs_down", "corrected", "ungrounded"], "r3": ["invalid_json"], "r4": ["thumbs_down", "labeled"]}
    assert [p.request_id for p in fly.positives] == ["r2"] and fly.interactions == 4
    assert fly.counts["requests_not_answered"] == 1
    assert fly.labels["r1"] == {"answer": "Run apt install followed by the package name."}  # the user's correction
    assert fly.labels["r4"]["answer"] == "The server listens on port 8000."  # the annotation not cancelled
    assert [f.request_id for f in fly.queue()] == ["r3"]
    why = [(s["file"], s["reason"]) for s in fly.skipped]
    assert ("requests.jsonl", "not JSON: Expecting property name enclosed in double quotes") in why
    assert any(f == "feedback.jsonl" and "do not hold" in r for f, r in why)
    assert any("request nowhere" in r for _, r in why)

    queue = flywheel.write_queue(fly, logs.project.workdir / "labeling")
    (task,) = json.loads(queue.read_text())
    assert task["data"]["request_id"] == "r3" and task["data"]["reasons"] == "invalid_json"
    assert task["predictions"][0]["result"][0]["value"]["text"] == ["options: a, b"]
    assert '<TextArea name="answer"' in (queue.parent / flywheel.LABEL_CONFIG_FILE).read_text()


def test_a_persons_label_outranks_the_checks_and_bad_labels_or_lines_lose_nothing_else(logs):
    folder = logs.project.workdir / "serving"
    with open(folder / "requests.jsonl", "ab") as handle:  # a line torn by a crash, mid-file
        handle.write(b'{"request_id": "torn", "messages": "\xff\xfe"}\n')
    requests = JsonlLog(folder / "requests.jsonl", 2**20, [])
    requests.write(_request("r6", "Which port?", "I cannot answer that.", json_requested=True, declined=True))
    requests.write(_request("r7", "Who maintains it?", "The INRIA team.", status=200))
    parts = [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Which "}, {"type": "text", "text": "year?"}]}]
    requests.write({**_request("r8", "", "1999."), "messages": parts})
    export = [
        {"data": {"request_id": "r3"}, "annotations": [{"result": [  # marked wrong, the pre-filled answer left as is
            {"from_name": "answer", "value": {"text": ["options: a, b"]}},
            {"from_name": "verdict", "value": {"choices": ["wrong"]}}]}]},
        {"data": {"request_id": "r7"}, "annotations": [{"result": [{"from_name": "answer", "value": {"text": [None, 3]}}]}]},
        {"data": {"request_id": "r7"}, "annotations": 5},
        {"data": {"request_id": "r7"}, "annotations": [{"result": 7}]},
        {"data": {"request_id": "r7"}, "annotations": [{"result": [{"from_name": "verdict", "value": {"choices": {"a": 1}}}]}]},
        {"data": {"request_id": "r8"}, "annotations": [{"result": [
            {"from_name": "answer", "value": {"text": "In 1999, write to ops@example.com."}}]}]},
    ]  # fmt: skip
    (folder / "labels" / "second-export.json").write_text(json.dumps(export))
    fly = flywheel.collect(logs)
    reasons = {f.request_id: f.reasons for f in fly.failures}
    assert "r6" not in reasons  # declined: the abstention sentence was served, not generated
    assert reasons["r8"] == ["labeled"] and fly.labels["r8"]["answer"] == "In 1999, write to [redacted:pii]."
    assert "r3" not in fly.labels and [f.request_id for f in fly.queue()] == ["r3"]
    why = [s["reason"] for s in fly.skipped]
    assert "not UTF-8 text" in why and any("marks the answer wrong but gives no other answer" in w for w in why)
    assert sum("neither an answer nor a 'correct' verdict" in w for w in why) == 4
    assert fly.interactions == 7  # r1-r4 and r6-r8: every other line of the file with the torn one was read


def test_relabeled_failures_are_trained_three_times_beside_rated_up_answers(logs):
    made = flywheel.examples(flywheel.collect(logs), logs, seed=13)
    answers = [r["messages"][-1]["content"] for r in made.sft if r["meta"]["form"] == "flywheel"]
    assert answers.count("Run apt install followed by the package name.") == 3
    assert answers.count("The server listens on port 8000.") == 3 and len(answers) == 6
    positives = [r for r in made.sft if r["meta"]["form"] == "flywheel_positive"]
    assert [p["meta"]["request_id"] for p in positives] == ["r2"]  # 4 wanted at share 0.4 of 6; one was rated up
    assert made.sft[0]["messages"][:2] == [
        SYSTEM,
        {"role": "user", "content": rag_user_message("How do I install a package?", [PASSAGE])},
    ]
    pair = next(p for p in made.dpo if p["meta"]["request_id"] == "r1")
    assert pair["chosen"][0]["content"].startswith("Run apt install") and pair["rejected"][0]["content"].startswith("Reboot")
    assert made.production == []

    assert flywheel.held_out("How do I install a package?", 0.3, 13) == flywheel.held_out("how do I install a package", 0.3, 13)
    held = logs.model_copy(update={"flywheel": logs.flywheel.model_copy(update={"production_fraction": 0.99})})
    kept = flywheel.examples(flywheel.collect(held), held, seed=13)
    assert {p["meta"]["request_id"] for p in kept.production} == {"r1", "r4"} and kept.dpo == []
    assert not any(r["meta"]["form"] == "flywheel" for r in kept.sft)  # held out: never trained on


def _sampling(config, base_url: str):
    """`config` with self-consistency on: two samples through `base_url`, no retries."""
    endpoint = config.flywheel.consistency_endpoint.model_copy(update={"base_url": base_url, "max_retries": 0})
    update = {"consistency_samples": 2, "consistency_endpoint": endpoint}
    return config.model_copy(update={"flywheel": config.flywheel.model_copy(update=update)})


def test_an_answer_the_model_does_not_repeat_is_uncertain_and_an_unreachable_sampler_loses_nothing(logs):
    requests = JsonlLog(logs.project.workdir / "serving" / "requests.jsonl", 2**20, [])
    requests.write(_request("r9", "Which version is documented?", "Version 1.04 of CamlIDL."))
    requests.write(_request("r10", "Which port does it use?", "Port 8080."))
    sampler = _Endpoint(lambda n, body: (200, "Port 8080."))  # agrees with r10's answer only
    try:
        fly = flywheel.collect(_sampling(logs, sampler.url))
    finally:
        sampler.close()
    uncertain = {f.request_id for f in fly.failures if "uncertain" in f.reasons}
    # Only answers nobody rated or labeled are sampled (r1-r4 were; r3 also asked for JSON).
    assert uncertain == {"r9"} and fly.counts["consistency_checked"] == 2
    assert len(sampler.requests) == 4 and all(r["metadata"] == flywheel.SAMPLE_MARK["metadata"] for r in sampler.requests)
    assert sampler.requests[0]["messages"][0] == SYSTEM and sampler.requests[0]["temperature"] == 0.8

    fly = flywheel.collect(_sampling(logs, "http://127.0.0.1:9/v1"))
    assert not any("uncertain" in f.reasons for f in fly.failures)
    assert any("self-consistency not checked" in s["reason"] and "127.0.0.1:9" in s["reason"] for s in fly.skipped)


def test_logs_and_labels_change_the_reuse_key(logs):
    before = flywheel.sources_digest(logs)
    JsonlLog(logs.project.workdir / "serving" / "feedback.jsonl", 2**20, []).write({"request_id": "r3", "rating": "down"})
    assert flywheel.sources_digest(logs) != before
    from doctune.synth.stage import external_digests

    more = logs.model_copy(update={"flywheel": logs.flywheel.model_copy(update={"upsample": 5})})
    assert external_digests(more, {}) != external_digests(logs, {})  # how the logs are used is part of the key too
    off = logs.model_copy(update={"flywheel": logs.flywheel.model_copy(update={"enabled": False})})
    assert flywheel.sources_digest(off) == "off" and flywheel.collect(off).interactions == 0


def _sets(golden: list[tuple[str, str]], production: list[tuple[str, str]]) -> EvalSets:
    return EvalSets(
        system_prompt="", abstentions={"en": "No."}, unanswerable=[], probes=[], heldout_texts=[], general_texts=[], block_size=8,
        max_blocks=1,
        golden=[{"question": q, "answer": a, "context": [PASSAGE]} for q, a in golden],
        production=[{"messages": [SYSTEM, {"role": "user", "content": q}], "answer": a, "question": q} for q, a in production],
    )  # fmt: skip


def test_the_judge_counts_a_position_biased_verdict_as_a_tie_and_the_rule_follows(make_config):
    sets = _sets([("How do I install a package?", "Run apt install."), ("Which port?", "8000")], [("Who wrote it?", "Ada")])
    candidate = {"golden": ["Run apt install.", "8000"], "production": ["Ada wrote it."]}
    champion = {"golden": ["Reboot.", "8000"], "production": ["Nobody."]}
    positional = _Endpoint(lambda n, body: (200, json.dumps({"better": "A"})))
    first = lambda body: body["messages"][1]["content"].split("Answer A:\n")[1]  # noqa: E731
    fair = _Endpoint(lambda n, body: (200, json.dumps({"better": "A" if first(body).startswith(("Run apt", "Ada")) else "B"})))
    try:
        cfg = JudgeConfig(enabled=True, endpoint={"base_url": positional.url, "max_retries": 0})
        biased = judge(cfg, sets, candidate, champion, "base", 200)
        assert biased["overall"]["ties"] == 3 and biased["overall"]["win_rate"]["mean"] == 0.5
        assert len(positional.requests) == 4  # identical answers ("8000") tie without asking
        assert any("Reference answer (written by a person):\nAda" in r["messages"][1]["content"] for r in positional.requests)
        cfg = JudgeConfig(enabled=True, endpoint={"base_url": fair.url, "max_retries": 0})
        won = judge(cfg, sets, candidate, champion, "base", 200)
        assert won["sets"]["production"]["wins"] == 1 and won["sets"]["golden"]["wins"] == 1
        assert won["overall"]["win_rate"]["mean"] == pytest.approx(2.5 / 3)
        assert [v["winner"] for v in won["verdicts"]] == ["candidate", "candidate", "tie"]
    finally:
        positional.close()
        fair.close()

    fenced = _Endpoint(lambda n, body: (200, '```json\n{"better": "a"}\n```'))  # read despite the fence
    silent = _Endpoint(lambda n, body: (200, "I think both are fine."))
    try:
        cfg = JudgeConfig(enabled=True, endpoint={"base_url": fenced.url, "max_retries": 0})
        assert judge(cfg, sets, candidate, champion, "base", 200)["overall"]["unusable"] == 0
        cfg = JudgeConfig(enabled=True, endpoint={"base_url": silent.url, "max_retries": 0})
        mute = judge(cfg, sets, candidate, champion, "base", 200)
    finally:
        fenced.close()
        silent.close()
    assert mute["overall"]["unusable"] == 2 and mute["sets"]["golden"]["win_rate"]["mean"] == 0.5

    rules = make_config().gate.rules
    assert "judge_win_rate" in decide({"candidate": scores(0.5), "champion": scores(0.4), "base": scores(0.3)}, {}, rules,
                                      None, mute)["failed"]  # 2 of 3 unusable: silence, not a pass  # fmt: skip
    models = {"candidate": scores(0.5), "champion": scores(0.4), "base": scores(0.3)}
    lost = {**won, "overall": {**won["overall"], "win_rate": {"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4, "n": 3}}}
    assert "judge_win_rate" in decide(models, {}, rules, None, lost)["failed"]
    assert decide(models, {}, rules, None, won)["decision"] == "promote"


@pytest.mark.server
def test_the_judge_asks_a_live_llama_cpp_server_both_orders(start_server):
    from conftest import free_port
    from doctune.models import bundled_gguf

    port = free_port()
    start_server(
        [sys.executable, "-m", "doctune.llama_server", "--model", str(bundled_gguf("smollm2-135m-instruct")),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--model_alias", "judge"],
        f"http://127.0.0.1:{port}/v1/models",
    )  # fmt: skip
    sets = _sets([("How do I install a package?", "Run apt install followed by the package name.")], [])
    cfg = JudgeConfig(enabled=True, endpoint={"base_url": f"http://127.0.0.1:{port}/v1", "model": "judge"})
    result = judge(cfg, sets, {"golden": ["Run apt install and the name."], "production": []},
                   {"golden": ["Reboot twice."], "production": []}, "base", 200)  # fmt: skip
    (verdict,) = result["verdicts"]
    assert len(verdict["replies"]) == 2 and all(json.loads(r)["better"] in ("A", "B") for r in verdict["replies"])
    assert verdict["winner"] in ("candidate", "champion", "tie") and result["overall"]["n"] == 1


@pytest.mark.server
def test_a_served_failure_relabeled_is_trained_three_times_and_never_in_the_golden_set(make_config, corpus, tmp_path):
    """Serve a champion, ask about a training chunk of the corpus, rate the answer down with a correction; the next
    synth run trains on the correction three times (and prefers it in DPO), and the golden set never holds it."""
    import pymupdf
    from test_serve import post, register

    from doctune.gate import registry
    from doctune.records import read_parquet
    from doctune.serve import Server
    from doctune.stages import execute_stage
    from doctune.tracking import Tracker

    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    with pymupdf.open(corpus / "camlidl-1.04.doc.pdf") as doc:
        doc.select([1, 2, 3, 4, 5, 6, 7, 8])
        doc.save(pdfs / "camlidl-excerpt.pdf", no_new_id=True)  # the same bytes, doc id and split every session
    config = make_config(pdfs, **{"serve.port": 0, "serve.n_ctx": 2048, "serve.apply_abstention_threshold": False,
                                  "flywheel.production_fraction": 0.0})  # fmt: skip
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("flywheel-test")
    ingest = execute_stage("ingest", config, tracker, parent, {})
    inputs = {"chunks": ingest.outputs["chunks"], "pages": ingest.outputs["pages"]}
    first = execute_stage("synth", config, tracker, parent, inputs)
    trained = {r["meta"]["chunk_id"] for r in _read(tracker, first.outputs["sft"], "train.jsonl") if "chunk_id" in r["meta"]}
    chunk = next(c for c in read_parquet(tracker.fetch(ingest.outputs["chunks"]) / "chunks.parquet") if c["chunk_id"] in trained)

    registry.promote(tracker, register(tracker, config, "served"), reason="test")
    server = Server(config)
    server.start()
    try:
        question = "What does this part of the CamlIDL manual describe?"
        messages = [{"role": "user", "content": rag_user_message(question, [chunk["text"]])}]
        status, reply, _ = post(f"{server.url}/v1/chat/completions", {"messages": messages, "max_tokens": 24, "temperature": 0})
        assert status == 200
        correction = f"It describes {chunk['section'] or 'the CamlIDL interface'}, as the passage says."
        assert post(f"{server.url}/feedback", {"request_id": reply["doctune"]["request_id"], "rating": "down",
                                               "correction": correction})[0] == 200  # fmt: skip
        unrated = [{"role": "user", "content": rag_user_message("What is CamlIDL?", [chunk["text"]])}]
        assert post(f"{server.url}/v1/chat/completions", {"messages": unrated, "max_tokens": 16})[0] == 200
        # Self-consistency samples of the unrated answer through the same server: answered, not logged as requests.
        second = execute_stage("synth", _sampling(config, f"{server.url}/v1"), tracker, parent, inputs)
    finally:
        server.close()
    assert len((server.log_dir / "requests.jsonl").read_text().splitlines()) == 2

    assert second.reused_from is None  # the logs are an input: new feedback makes new data
    sft = _read(tracker, second.outputs["sft"], "train.jsonl")
    relabeled = [r for r in sft if r["meta"]["form"] == "flywheel"]
    assert len(relabeled) == 3 and all(r["messages"][-1]["content"] == correction for r in relabeled)
    (pair,) = [p for p in _read(tracker, second.outputs["dpo"], "train.jsonl") if p["meta"].get("form") == "flywheel"]
    assert (
        pair["chosen"][0]["content"] == correction and pair["rejected"][0]["content"] == reply["choices"][0]["message"]["content"]
    )
    golden = _read(tracker, second.outputs["golden"], "golden.jsonl")
    assert golden and all(item["question"] != question for item in golden)
    report = json.loads((tracker.fetch(second.outputs["report"]) / "synth_report.json").read_text())
    assert report["flywheel"]["interactions"] == 2 and report["flywheel"]["counts"]["mined_thumbs_down"] == 1
    assert report["flywheel"]["counts"]["sft_failure_records"] == 3
    assert report["flywheel"]["counts"]["consistency_checked"] == 1 and not report["flywheel"]["skipped"]


def _read(tracker, ref, name: str) -> list[dict]:
    return [json.loads(line) for line in (Path(tracker.fetch(ref)) / name).read_text().splitlines()]


def test_doctune_flywheel_prints_what_was_mined_and_writes_the_queue(logs, capsys):
    from doctune_kfp.pipelines.cli import main

    assert main(["flywheel", "--set", f"project.workdir={logs.project.workdir}"]) == 0
    out = capsys.readouterr().out
    assert "4 answered requests" in out
    assert "failures 3 (thumbs_down 2, corrected 1, labeled 1, invalid_json 1, ungrounded 1)" in out
    assert "1 failures wait for a label" in out and "skipped: requests.jsonl line 6: not JSON" in out
    queue = logs.project.workdir / "serving" / "labeling" / flywheel.QUEUE_FILE
    assert [t["data"]["request_id"] for t in json.loads(queue.read_text())] == ["r3"]
