"""The gate's decision: every rule from config evaluated on the scores; one failed rule rejects the candidate."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from doctune.config import GateRules
from doctune.gate.metrics import paired_randomization_p

PROMOTE, REJECT = "promote", "reject"


@dataclass
class Rule:
    name: str
    passed: bool
    value: float
    threshold: float
    detail: str


def decide(scores: dict[str, dict], variant_ratios: dict[str, float | None], rules: GateRules) -> dict:
    """`scores`: evaluate_model results for "candidate", "champion" and "base" (champion may be the base);
    `variant_ratios`: perplexity ratio to the merged model of each gated variant (None: it was not produced)."""
    cand, champ, base = (scores[k]["metrics"] for k in ("candidate", "champion", "base"))
    # A base model below the structured-output bar (a 135M model is) sets it: tuning must not lose what it had.
    format_bar = min(rules.min_format_compliance, base["format_compliance"])
    checks = [
        Rule("golden_f1_vs_champion", cand["golden_f1"] >= rules.min_f1_vs_champion * champ["golden_f1"], cand["golden_f1"],
             rules.min_f1_vs_champion * champ["golden_f1"], f">= {rules.min_f1_vs_champion} x champion {champ['golden_f1']:.4f}"),
        Rule("abstention_vs_champion", cand["abstention_accuracy"] >= champ["abstention_accuracy"] - rules.abstention_tolerance,
             cand["abstention_accuracy"], champ["abstention_accuracy"] - rules.abstention_tolerance,
             f">= champion {champ['abstention_accuracy']:.4f} - {rules.abstention_tolerance}"),
        Rule("format_compliance", cand["format_compliance"] >= format_bar, cand["format_compliance"], format_bar,
             f">= {rules.min_format_compliance}, or base {base['format_compliance']:.4f} where the base falls short"),
        Rule("capability_vs_base", cand["capability_accuracy"] >= rules.min_probes_vs_base * base["capability_accuracy"],
             cand["capability_accuracy"], rules.min_probes_vs_base * base["capability_accuracy"],
             f">= {rules.min_probes_vs_base} x base {base['capability_accuracy']:.4f}"),
        Rule("general_perplexity_vs_base",
             cand["general_perplexity"] <= rules.max_general_ppl_vs_base * base["general_perplexity"],
             cand["general_perplexity"], rules.max_general_ppl_vs_base * base["general_perplexity"],
             f"<= {rules.max_general_ppl_vs_base} x base {base['general_perplexity']:.4f}"),
    ]  # fmt: skip
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
        checks.append(Rule(f"perplexity_ratio:{variant}", ok, float("nan") if ratio is None else ratio,
                           rules.max_quantized_ppl_ratio, "not produced" if ratio is None else "<= x merged"))  # fmt: skip
    for key, label in (("golden_f1", "golden F1"), ("abstained", "abstention")):
        p = paired_randomization_p(
            scores["candidate"]["per_example"][key], scores["champion"]["per_example"][key], rules.permutations
        )
        checks.append(Rule(f"not_significantly_worse:{key}", p >= rules.alpha, p, rules.alpha,
                           f"paired randomization p (candidate worse than champion on {label}) >= alpha"))  # fmt: skip
    failed = [r.name for r in checks if not r.passed]
    return {"decision": REJECT if failed else PROMOTE, "failed": failed, "rules": [asdict(r) for r in checks]}
