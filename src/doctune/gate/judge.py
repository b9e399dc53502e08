"""The pairwise LLM judge of the gate: the candidate's answers against the champion's (the base model's before a
first promotion), on the production set and the golden set, each pair judged twice with A/B swapped; a verdict
stands only where both orders agree, a disagreement is a tie. Win rate = (wins + ties / 2) / items, with its
bootstrap interval. No judge model is bundled: any OpenAI-compatible server (gate.judge.endpoint)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from doctune.chat import rag_user_message
from doctune.config import JudgeConfig
from doctune.endpoint import JUDGE_SYSTEM, ChatClient, EndpointError, PairwiseJudge, judge_prompt
from doctune.gate.evaluate import EvalSets
from doctune.gate.metrics import interval
from doctune.redact import redact, redact_obj

POINTS = {"a": 1.0, "b": 0.0, "tie": 0.5, "unusable": 0.5}  # an unusable reply says nothing either way
MAX_UNUSABLE = 0.5  # past this share of unusable replies the win rate is the judge's silence, not a verdict


class JudgeError(RuntimeError):
    """The configured judge cannot be asked."""


def _items(sets: EvalSets, candidate: dict, champion: dict, limit: int) -> list[dict]:
    """(set, prompt shown to the judge, reference, candidate answer, champion answer), production first."""
    items = [
        {"set": "production", "question": item["messages"][-1]["content"], "reference": item["answer"], "a": a, "b": b}
        for item, a, b in zip(sets.production, candidate["production"], champion["production"])
    ]
    items += [
        {"set": "golden", "question": rag_user_message(item["question"], item["context"]), "reference": item["answer"],
         "a": a, "b": b}
        for item, a, b in zip(sets.golden, candidate["golden"], champion["golden"])
    ]  # fmt: skip
    return items[:limit]


def judge(config: JudgeConfig, sets: EvalSets, candidate: dict, champion: dict, against: str, resamples: int) -> dict:
    """Verdicts on the candidate's and the champion's answers ({"golden": [...], "production": [...]} each)."""
    pairwise = PairwiseJudge(ChatClient(config.endpoint, role="judge", section="gate.judge.endpoint"))
    items = _items(sets, candidate, champion, config.max_items)
    try:
        with ThreadPoolExecutor(config.endpoint.max_concurrency) as pool:
            verdicts = list(pool.map(lambda i: pairwise.compare(i["question"], i["a"], i["b"], i["reference"]), items))
    except EndpointError as exc:
        raise JudgeError(f"gate.judge: {exc}") from None
    rows = redact_obj([
        {"set": i["set"], "question": i["question"][-300:], "reference": i["reference"], "candidate": i["a"],
         "champion": i["b"], "winner": {"a": "candidate", "b": "champion"}.get(v["winner"], v["winner"]),
         "replies": v["replies"]}
        for i, v in zip(items, verdicts)
    ])  # fmt: skip

    def summary(selected: list[tuple[dict, dict]]) -> dict:
        points = [POINTS[v["winner"]] for _, v in selected]
        outcome = {k: sum(v["winner"] == k for _, v in selected) for k in POINTS}
        rate = interval(points, resamples) if points else None  # no items: no rate (not NaN, which JSON cannot hold)
        return {"n": len(points), "wins": outcome["a"], "losses": outcome["b"], "ties": outcome["tie"],
                "unusable": outcome["unusable"], "win_rate": rate}  # fmt: skip

    pairs = list(zip(items, verdicts))
    return {
        "against": against,
        "model": config.endpoint.model,
        "base_url": redact(config.endpoint.base_url),
        "system": JUDGE_SYSTEM,
        "prompt": judge_prompt("<question with its passages>", "<answer A>", "<answer B>", "<reference answer>"),
        "sets": {name: summary([p for p in pairs if p[0]["set"] == name]) for name in ("production", "golden")},
        "overall": summary(pairs),
        "verdicts": rows,
    }
