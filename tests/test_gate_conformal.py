"""The conformal abstention threshold: its bound holds on synthetic scores, and its edge cases are stated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from doctune.gate.conformal import (
    ALWAYS,
    NEVER,
    abstention_bound,
    calibration_split,
    clopper_pearson,
    declines,
    items_needed,
    risk_control_threshold,
)


def test_the_threshold_keeps_the_hallucination_rate_at_most_alpha_with_the_stated_confidence():
    rng = np.random.default_rng(0)
    alpha, delta, n = 0.1, 0.1, 120
    realised = []
    for _ in range(1500):
        # Unanswerable prompts: a score the model gives the abstention sentence; it declines by itself 30% of the time.
        cal_scores, test_scores = rng.normal(0, 1, n), rng.normal(0, 1, 2000)
        cal_abstained, test_abstained = rng.random(n) < 0.3, rng.random(2000) < 0.3
        t = risk_control_threshold(cal_scores.tolist(), cal_abstained.tolist(), alpha, delta)
        realised.append(np.mean([not declines(s, a, t) for s, a in zip(test_scores, test_abstained)]))
    # The guarantee: over calibration draws, the rate exceeds alpha at most delta of the time (1500 draws: +-0.008).
    assert np.mean(np.array(realised) > alpha) <= delta
    assert np.median(realised) >= alpha / 3  # and not bought by declining everything


def test_edge_cases_decline_always_or_never_and_say_so():
    assert items_needed(0.1, 0.1) == 22
    assert risk_control_threshold([0.1] * 21, [False] * 21, 0.1, 0.1) == ALWAYS  # 21 items cannot state the bound
    assert risk_control_threshold([0.1] * 30, [True] * 30, 0.1, 0.1) == NEVER  # the model declines every one by itself
    # 60 items at alpha 0.1, confidence 0.9: two answered unanswerable items are tolerated (upper bound 0.086), three
    # are not (0.108), so the threshold is the third-lowest score and the two below it are answered
    scores = [float(i) for i in range(60)]
    assert risk_control_threshold(scores, [False] * 60, 0.1, 0.1) == 2.0
    assert declines(2.0, False, 2.0) and not declines(1.5, False, 2.0) and declines(-5.0, True, 2.0)


def test_clopper_pearson_interval_covers_the_rate():
    low, high = clopper_pearson(3, 30)
    assert 0.02 < low < 0.1 < high < 0.27
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0


def test_bound_report_on_separable_scores():
    # Answerable prompts score low on the abstention sentence, unanswerable ones high: the threshold separates them.
    golden = {"score": [-3.0 + 0.01 * i for i in range(100)], "abstained": [False] * 100, "f1": [0.5] * 100}
    unanswerable = {"score": [-0.5 + 0.01 * i for i in range(100)], "abstained": [False] * 100}
    keys = [f"u{i}" for i in range(100)]
    bound = abstention_bound(golden, unanswerable, keys, alpha=0.1, delta=0.1, fraction=0.5, seed=13)
    assert bound.calibration_items + bound.test_items == 100 and bound.raw_hallucination_rate == 1.0
    assert max(golden["score"]) < bound.threshold < max(unanswerable["score"]) and bound.stated
    test = [k for k, c in enumerate(calibration_split(keys, 0.5, 13)) if not c]
    assert bound.hallucination_rate == sum(unanswerable["score"][k] < bound.threshold for k in test) / len(test)
    assert bound.answered_items == 100 and bound.answer_rate == 1.0 and math.isclose(bound.f1_at_threshold, 0.5)
    assert bound.as_dict()["threshold"] == bound.threshold
    few = abstention_bound(golden, {k: v[:10] for k, v in unanswerable.items()}, keys[:10], 0.1, 0.1, 0.5, 13)
    assert not few.stated and few.as_dict()["threshold"] == "always" and few.answer_rate == 0.0


def test_the_risk_score_is_the_mean_log_probability_of_the_abstention_sentence_as_the_reply(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from doctune.chat import reply_sequences
    from doctune.runtimes import TransformersRuntime

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = [[{"role": "user", "content": "Which command installs a package?"}], [{"role": "user", "content": "Hi"}]]
    sequences = reply_sequences(tokenizer, conversations, ["I cannot answer that."] * len(conversations))
    for (ids, start), messages in zip(sequences, conversations):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(ids[:start]) == prompt
        assert ids[-1] == tokenizer.eos_token_id and "I cannot answer that." in tokenizer.decode(ids[start:])
    runtime = TransformersRuntime(tiny_model_dir)
    try:
        scores = runtime.continuation_logprobs(sequences)
        ids, start = sequences[0]
        with torch.no_grad():
            logits = runtime.model(input_ids=torch.tensor([ids])).logits[0]
        expected = torch.log_softmax(logits, -1)[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].mean()
    finally:
        runtime.close()
    assert math.isclose(scores[0], float(expected), rel_tol=1e-5) and scores[0] < 0


def test_replies_scored_on_the_prompts_cache_equal_separate_generation_and_scoring(tiny_model_dir):
    from transformers import AutoTokenizer

    from doctune.chat import reply_sequences
    from doctune.runtimes import TransformersRuntime

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = [  # prompts of different lengths in one batch (left padding), tails of different lengths
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Which command installs a package from the interface definition file?"}],
        [{"role": "user", "content": "What does the stub compiler emit for each exception?"}],
    ]
    sequences = [
        *reply_sequences(tokenizer, conversations[:2], ["I cannot answer that."] * 2),
        *reply_sequences(tokenizer, conversations[2:], ["No."] * len(conversations[2:])),
    ]
    runtime = TransformersRuntime(tiny_model_dir, batch_size=2)
    try:
        plain = runtime.chat(conversations, 12)
        scored = runtime.chat(conversations, 12, sequences)
        expected = runtime.continuation_logprobs(sequences)
    finally:
        runtime.close()
    assert [r.text for r in scored] == [r.text for r in plain] and all(r.continuation_logprob is None for r in plain)
    for reply, score in zip(scored, expected):
        assert math.isclose(reply.continuation_logprob, score, rel_tol=1e-4)


def test_gguf_replies_are_scored_on_the_prompts_cache_as_serving_scores_them(tmp_path):
    from transformers import AutoTokenizer

    from doctune.chat import reply_sequences
    from doctune.models import bundled_gguf
    from doctune.runtimes import LlamaCppRuntime, log_softmax

    gguf = bundled_gguf("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    conversations = [
        [{"role": "user", "content": "Packages are installed with apt install. Who painted the Mona Lisa?"}],
        [{"role": "user", "content": "Which command installs a package?"}],
    ]
    sequences = reply_sequences(tokenizer, conversations, ["The documents do not say."] * len(conversations))
    answering = LlamaCppRuntime(gguf, n_ctx=512)
    serving = LlamaCppRuntime(gguf, n_ctx=512, chat=False)  # as `doctune serve` scores a request
    try:
        plain = answering.chat(conversations, 8)
        scored = answering.chat(conversations, 8, sequences)
        served = serving.continuation_logprobs(sequences)
        whole = serving._scoring()  # every position's logits in one pass: the same quantity, other kernels
        expected = []
        for ids, start in sequences:
            whole.reset()
            whole.eval(ids)
            rows = log_softmax(whole.scores[start - 1 : len(ids) - 1])
            expected.append(sum(rows[i, t] for i, t in enumerate(ids[start:])) / (len(ids) - start))
    finally:
        answering.close()
        serving.close()
    assert [r.text for r in scored] == [r.text for r in plain]
    for reply, score, reference in zip(scored, served, expected):
        assert reply.continuation_logprob == pytest.approx(score, abs=1e-3)
        assert reply.continuation_logprob == pytest.approx(reference, abs=0.3)
