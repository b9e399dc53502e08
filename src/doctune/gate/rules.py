"""The gate's decision: every rule from config evaluated on the scores. All pass: promote. Sets too small to detect
the configured differences: insufficient evidence (recorded like a rejection). Otherwise one failed rule rejects."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from doctune.config import GateRules
from doctune.gate.conformal import AbstentionBound, items_needed
from doctune.gate.judge import MAX_UNUSABLE
from doctune.gate.metrics import (
    min_detectable_difference,
    paired_difference,
    paired_randomization_p,
    paired_sd,
    ratio_shortfall_bound,
)

PROMOTE, REJECT, INSUFFICIENT = "promote", "reject", "insufficient-evidence"
INSUFFICIENT_EVIDENCE = "insufficient_evidence"  # what `failed` lists when a power check fails
POWER = 0.8


@dataclass
class Rule:
    name: str
    passed: bool
    value: float
    threshold: float
    detail: str


def gated_variants(
    requested: list[str], fallbacks: dict[str, str], ratios: dict[str, float | None], max_ratio: float
) -> tuple[list[str], dict[str, str]]:
    """The variants the gate holds to its rules: each requested one, or the first of its fallback chain that was
    produced and is within `max_ratio` of the merged model's perplexity (the requested one when none is: its rule
    then fails). `ratios`: perplexity ratio of each variant produced. Returns the gated variants and, for each that
    stands in for another, why."""

    def why(v: str) -> str:
        return "not produced" if ratios.get(v) is None else f"perplexity ratio {ratios[v]:.4f} > {max_ratio}"

    gated, replaced = [], {}
    for variant in requested:
        chain = [variant]
        while (fallback := fallbacks.get(chain[-1])) is not None and fallback not in chain:
            chain.append(fallback)
        passing = [v for v in chain if ratios.get(v) is not None and ratios[v] <= max_ratio]
        chosen = passing[0] if passing else variant
        if chosen != variant:
            replaced[chosen] = "; ".join(f"in place of {v}: {why(v)}" for v in chain[: chain.index(chosen)])
        if chosen not in gated:
            gated.append(chosen)
    return gated, replaced


def decide(
    scores: dict[str, dict],
    variant_ratios: dict[str, float | None],
    rules: GateRules,
    bounds: dict[str, AbstentionBound] | None = None,
    judged: dict | None = None,
    replaced: dict[str, str] | None = None,
) -> dict:
    """`scores`: evaluate_model results for "candidate", "champion" and "base" (champion may be the base);
    `variant_ratios`: perplexity ratio to the merged model of each gated variant (None: it was not produced);
    `bounds`: per candidate model (merged, gated variants), its abstention threshold tested on its split;
    `judged`: the pairwise judge's verdicts (None: no judge configured); `replaced`: why a gated variant stands in
    for another (gated_variants)."""
    cand, champ, base = (scores[k]["metrics"] for k in ("candidate", "champion", "base"))
    # A base model below the structured-output bar (a 135M model is) sets it: tuning must not lose what it had.
    format_bar = min(rules.min_format_compliance, base["format_compliance"])
    checks = [
        Rule("golden_f1_vs_champion", cand["golden_f1"] >= rules.min_f1_vs_champion * champ["golden_f1"], cand["golden_f1"],
             rules.min_f1_vs_champion * champ["golden_f1"], f">= {rules.min_f1_vs_champion} x champion {champ['golden_f1']:.4f}"),
        Rule("abstention_vs_champion", cand["abstention_accuracy"] >= champ["abstention_accuracy"] - rules.abstention_tolerance,
             cand["abstention_accuracy"], champ["abstention_accuracy"] - rules.abstention_tolerance,
             f">= champion {champ['abstention_accuracy']:.4f} - {rules.abstention_tolerance}"),
        Rule("abstention_accuracy", cand["abstention_accuracy"] >= rules.min_abstention_accuracy, cand["abstention_accuracy"],
             rules.min_abstention_accuracy, "share of unanswerable questions declined >= this"),
        Rule("false_abstention", cand["false_abstention_rate"] <= rules.max_false_abstention, cand["false_abstention_rate"],
             rules.max_false_abstention, "share of answerable questions declined <= this"),
        Rule("format_compliance", cand["format_compliance"] >= format_bar, cand["format_compliance"], format_bar,
             f">= {rules.min_format_compliance}, or base {base['format_compliance']:.4f} where the base falls short"),
        Rule("capability_vs_base", cand["capability_accuracy"] >= rules.min_probes_vs_base * base["capability_accuracy"],
             cand["capability_accuracy"], rules.min_probes_vs_base * base["capability_accuracy"],
             f">= {rules.min_probes_vs_base} x base {base['capability_accuracy']:.4f}"),
        Rule("general_perplexity_vs_base",
             cand["general_perplexity"] <= rules.max_general_ppl_vs_base * base["general_perplexity"],
             cand["general_perplexity"], rules.max_general_ppl_vs_base * base["general_perplexity"],
             f"<= {rules.max_general_ppl_vs_base} x base {base['general_perplexity']:.4f}"),
        # Held-out domain text no stage trained on: a candidate that models it worse than the base lost knowledge.
        Rule("domain_perplexity_vs_base",
             cand["domain_perplexity"] <= rules.max_domain_ppl_vs_base * base["domain_perplexity"],
             cand["domain_perplexity"], rules.max_domain_ppl_vs_base * base["domain_perplexity"],
             f"<= {rules.max_domain_ppl_vs_base} x base {base['domain_perplexity']:.4f}"),
    ]  # fmt: skip
    if rules.min_citation_precision_vs_champion > 0:
        checks.append(citation_rule(scores, rules))
    if rules.beat_base:
        # Significantly better, not merely higher: p that the base is not worse than the candidate.
        p = paired_randomization_p(
            scores["base"]["per_example"]["golden_f1"], scores["candidate"]["per_example"]["golden_f1"], rules.permutations
        )
        checks.append(Rule("golden_f1_beats_base", cand["golden_f1"] > base["golden_f1"] and p < rules.alpha, p, rules.alpha,
                           f"golden F1 {cand['golden_f1']:.4f} > base {base['golden_f1']:.4f}, "
                           "paired randomization p (candidate better than base) < alpha"))  # fmt: skip
    for variant, ratio in variant_ratios.items():
        ok = ratio is not None and ratio <= rules.max_quantized_ppl_ratio
        detail = "not produced" if ratio is None else "<= x merged"
        if variant in (replaced or {}):
            detail += f" ({replaced[variant]})"
        checks.append(Rule(f"perplexity_ratio:{variant}", ok, float("nan") if ratio is None else ratio,
                           rules.max_quantized_ppl_ratio, detail))  # fmt: skip
    for key, label in (("golden_f1", "golden F1"), ("abstained", "abstention"), ("source_cited", "citation recall")):
        p = paired_randomization_p(
            scores["candidate"]["per_example"][key], scores["champion"]["per_example"][key], rules.permutations
        )
        checks.append(Rule(f"not_significantly_worse:{key}", p >= rules.alpha, p, rules.alpha,
                           f"paired randomization p (candidate worse than champion on {label}) >= alpha"))  # fmt: skip
    bounds = {m: b for m, b in (bounds or {}).items() if m == "candidate" or m.removeprefix("candidate ") in variant_ratios}
    for model, bound in bounds.items():
        low, high = bound.hallucination_ci
        name = "hallucination_bound" + model.removeprefix("candidate").replace(" ", ":")
        checks.append(Rule(name, not bound.exceeded, bound.hallucination_rate, bound.alpha,
                           f"unanswerable questions answered at the abstention threshold, 95% interval [{low:.3f}, "
                           f"{high:.3f}] on {bound.test_items} test items, not above alpha"))  # fmt: skip
    if judged is not None:
        overall = judged["overall"]
        rate, unusable = overall["win_rate"], overall["unusable"] / max(1, overall["n"])
        # A judge whose replies mostly cannot be read scores 0.5 by default: that is silence, not a pass.
        ok = rate is not None and rate["mean"] >= rules.min_judge_win_rate and unusable <= MAX_UNUSABLE
        value = float("nan") if rate is None else rate["mean"]
        where = "" if rate is None else f", 95% interval [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}]"
        checks.append(Rule("judge_win_rate", ok, value, rules.min_judge_win_rate,
                           f"pairwise judge ({judged['model']}) vs {judged['against']} over {overall['n']} items, ties "
                           f"half{where}; unusable replies {overall['unusable']} (at most {MAX_UNUSABLE:.0%})"))  # fmt: skip
    evidence = power(scores, rules, citation_failed=any(r.name == CITATION_RULE and not r.passed for r in checks))
    power_rules = [evidence_rule(key, e) for key, e in evidence.items()]
    if "candidate" in bounds:
        power_rules.append(bound_evidence_rule(bounds["candidate"]))
    failed = [r.name for r in checks if not r.passed]
    short = [r for r in power_rules if not r.passed]
    if not failed and not short:
        decision, reason = PROMOTE, "every rule passed"
    elif short:
        # Without the power to see the configured difference a pass or a failure says little: more items decide.
        decision, reason = INSUFFICIENT, " ".join(r.detail for r in short)
        failed = [INSUFFICIENT_EVIDENCE, *failed]
    else:
        decision, reason = REJECT, f"failed: {', '.join(failed)}"
    return {
        "decision": decision,
        "reason": reason,
        "failed": failed,
        "rules": [asdict(r) for r in [*power_rules, *checks]],
        "evidence": evidence,
        "f1_differences": f1_differences(scores, rules),
    }


CITATION_RULE = "citation_precision_vs_champion"


def citation_rule(scores: dict[str, dict], rules: GateRules) -> Rule:
    """Citation precision not significantly below factor x the champion's (the base's before a first promotion):
    fails where the paired bootstrap's one-sided 95% upper bound of the shortfall is below 0, so a champion's
    precision over a handful of citations does not reject a candidate that is as good."""
    factor = rules.min_citation_precision_vs_champion
    cand, champ = scores["candidate"], scores["champion"]
    sums = [(m["per_example"]["citations_supported"], m["per_example"]["citations_made"]) for m in (cand, champ)]
    bound = ratio_shortfall_bound(*sums, factor, rules.bootstrap_resamples, level=1 - rules.alpha)
    made = [int(sum(m["per_example"]["citations_made"])) for m in (cand, champ)]
    value, floor = cand["metrics"]["citation_precision"], factor * champ["metrics"]["citation_precision"]
    return Rule(CITATION_RULE, not bound < 0, value, floor,
                f"not significantly below {factor:g} x champion {champ['metrics']['citation_precision']:.4f} "
                f"(cited passages that hold the answer; {made[0]} vs {made[1]} cited): the paired bootstrap's "
                f"{1 - rules.alpha:.0%} upper bound of the shortfall is {bound:+.3f}")  # fmt: skip


def power(scores: dict[str, dict], rules: GateRules, citation_failed: bool = False) -> dict[str, dict]:
    """The smallest candidate-vs-base difference each eval set detects (one-sided paired test at alpha, 80% power),
    from the spread of the observed per-item differences, against the configured margin."""
    out = {}
    for key, per_example, margin, binary in (
        ("golden_f1", "golden_f1", rules.min_detectable_f1, False),
        ("abstention", "abstained", rules.min_detectable_abstention, True),
    ):
        cand, base = scores["candidate"]["per_example"][per_example], scores["base"]["per_example"][per_example]
        sd = paired_sd(cand, base, binary=binary)
        detectable = min_detectable_difference(sd, len(cand), rules.alpha, POWER)
        checked = margin < 1  # no difference of two scores in [0, 1] exceeds 1: a margin of 1 or more is the check off
        out[key] = {"n": len(cand), "sd": sd, "detectable": detectable, "margin": margin, "alpha": rules.alpha,
                    "power": POWER, "checked": checked, "sufficient": detectable <= margin or not checked}  # fmt: skip
    if rules.min_citation_precision_vs_champion > 0:
        out["citation_precision"] = citation_power(scores, rules, citation_failed)
    return out


def citation_power(scores: dict[str, dict], rules: GateRules, citation_failed: bool = False) -> dict:
    """The precision shortfall below the champion's floor that the candidate's citations can show at alpha with 80%
    power: (z_1-alpha + z_0.8) x sd / sqrt(citations), sd the larger binomial spread of the floor and of the
    floor less the margin, so a handful of citations all right is no more evidence than a handful half right.
    Checked where it decides something: the champion has a supported citation (else the floor is 0) and the
    rule passed (a candidate significantly below the floor is rejected, not sent for more data)."""
    cand, champ = scores["candidate"], scores["champion"]
    cited = int(sum(cand["per_example"]["citations_made"]))
    floor = rules.min_citation_precision_vs_champion * champ["metrics"]["citation_precision"]
    margin = rules.min_detectable_citation_precision
    # Where the floor is 0 (no citing champion yet) nothing is known of the rate to test: the worst spread, 0.5.
    spread = max(math.sqrt(p * (1 - p)) for p in (floor, max(floor - margin, 0.0))) if floor > 0 else 0.5
    detectable = min_detectable_difference(spread, cited, rules.alpha, POWER)
    unchecked = (
        f"margin {margin:g} >= 1" if margin >= 1
        else "the champion's floor is 0: nothing falls below it" if sum(champ["per_example"]["citations_supported"]) == 0
        else "the rule already found the candidate significantly below the floor" if citation_failed
        else ""
    )  # fmt: skip
    return {"n": cited, "sd": spread, "detectable": detectable, "margin": margin, "alpha": rules.alpha,
            "power": POWER, "checked": not unchecked, "sufficient": detectable <= margin or bool(unchecked),
            "unchecked": unchecked}  # fmt: skip


_SETS = {
    "golden_f1": ("golden items", "an F1 difference",
                  "give the corpus more text or raise synth.min_golden (or gate.max_golden where synth made more)"),
    "abstention": ("unanswerable items", "an abstention difference",
                   "raise synth.unanswerable_share or synth.min_golden (or gate.max_unanswerable where synth made more)"),
    "citation_precision": ("candidate citations", "a citation precision shortfall below the champion's floor",
                           "the candidate cites too few passages to show its precision; more golden items "
                           "(synth.min_golden, gate.max_golden) give it more to cite"),
}  # fmt: skip


def evidence_rule(key: str, e: dict) -> Rule:
    """A power check as a rule, its detail saying what the set detects, what the gate needs and what to do."""
    items, difference, remedy = _SETS[key]
    if e["n"] < 2:
        found = f"{e['n']} {items.removesuffix('s') if e['n'] == 1 else items} cannot estimate {difference}"
    else:
        found = f"{e['n']} {items} detect {difference} of {e['detectable']:.3f}"
        found += f" at alpha {e['alpha']:g} and {e['power']:.0%} power"
    if not e.get("checked", True):
        why = e.get("unchecked") or f"margin {e['margin']:g} >= 1"
        return Rule(f"evidence:{key}", True, e["detectable"], e["margin"], f"{found}; not checked ({why})")
    detail = f"{found}; the gate needs {e['margin']:g}" + ("" if e["sufficient"] else f": {remedy}")
    return Rule(f"evidence:{key}", e["sufficient"], e["detectable"], e["margin"], detail)


def bound_evidence_rule(bound: AbstentionBound) -> Rule:
    """Whether the calibration split could state the hallucination bound at all."""
    needed = items_needed(bound.alpha, 1 - bound.confidence)
    detail = (f"{bound.calibration_items} calibration items state a hallucination rate <= {bound.alpha:g} with "
              f"confidence {bound.confidence:g} (at least {needed} needed)")  # fmt: skip
    if not bound.stated:
        detail += ": raise synth.unanswerable_share or synth.min_golden (or gate.max_unanswerable), or gate.hallucination_alpha"
    return Rule("evidence:hallucination_bound", bound.stated, bound.calibration_items, needed, detail)


def f1_differences(scores: dict[str, dict], rules: GateRules) -> dict[str, dict]:
    """Golden F1 of the candidate minus the base's and the champion's, per item, with paired bootstrap intervals."""
    cand = scores["candidate"]["per_example"]["golden_f1"]
    return {
        f"candidate - {other}": paired_difference(cand, scores[other]["per_example"]["golden_f1"], rules.bootstrap_resamples)
        for other in ("base", "champion")
    }
