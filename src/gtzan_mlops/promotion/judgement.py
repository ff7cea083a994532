"""The challenger judged: scored as served on the current test clips, compared with the champion on
the same clips, put through the behavioural gate when that comparison would promote it, and the
rule's decision (rule.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gtzan_mlops.promotion.champion import load_champion
from gtzan_mlops.promotion.rule import (
    NO_CHAMPION,
    BehaviourResult,
    Comparison,
    Decision,
    apply_gate,
    decide_on_the_clips,
    leaked_clips,
)
from gtzan_mlops.promotion.served_evaluation import (
    ServedModel,
    SplitClips,
    check_behaviour,
    compare,
    served_scores,
)
from gtzan_mlops.settings.schema import Promote, Uncertainty


def judge(
    challenger: ServedModel,
    held_by: Any,
    record: dict[str, Any],
    clips: SplitClips,
    promote: Promote,
    uncertainty: Uncertainty,
    load_model: Callable[[str], Any],
) -> dict[str, Any]:
    """Score the challenger (and the champion, the model version `held_by` holds the alias) on
    the test clips as served, run the gate, and decide by the rule of `promote`; returns the
    evidence and the Decision under "decision".

    The gate plays every test clip to the challenger once per transform (six by default, three
    times the plays of the comparison), and it can only stop a promotion: it runs only when the
    comparison would promote. A challenger the champion keeps out has no behaviour (None)."""
    if not clips.test:
        reason = (
            "the split holds no clip wholly in its test set (a leaky segment split), so served "
            "models cannot be compared or checked on whole clips; registered, not promoted"
        )
        return {"decision": Decision(False, reason, "no_test_clips"), "served": {}}
    ours = challenger.genres(clips.test)
    served = served_scores(clips, ours, uncertainty)
    champion, absent_reason = load_champion(
        held_by, promote.model_name, promote.unloadable_champion, load_model
    )
    comparison = leaked = None
    if champion is not None:
        version = str(champion.version.version)
        theirs = champion.served.genres(clips.test)
        comparison = compare(clips, ours, theirs, version, promote.metric, uncertainty)
        leaked = leaked_clips(
            champion.training_clips, {clip.track_id: clip.samples_sha256 for clip in clips.test}
        )
    decision = decide_on_the_clips(
        comparison,
        promote.min_improvement,
        promote.require_significant,
        leaked or (),
        same_classifier=champion is not None
        and champion.version.tags.get("classifier_uri") == record["model_uri"],
        no_champion_reason=absent_reason or NO_CHAMPION,
    )
    behaviour = None
    if decision.promote:
        behaviour = check_behaviour(challenger, clips, ours, promote.behaviour)
        decision = apply_gate(behaviour, decision)
    else:
        decision = dataclasses.replace(
            decision,
            reason=f"{decision.reason} (behaviour not measured: it can only stop a promotion)",
        )
    if champion is not None and leaked is None:
        decision = dataclasses.replace(
            decision,
            reason=f"{decision.reason} (champion version {champion.version.version} recorded "
            "no training clips: leakage could not be checked)",
        )
    return {
        "decision": decision,
        "served": served,
        "behaviour": behaviour,
        "comparison": comparison,
        "leaked": leaked,
    }


def run_metrics(judged: dict[str, Any]) -> dict[str, float]:
    """The serving run's MLflow metrics: served test scores with their interval, behaviour,
    and the comparison with the champion."""
    metrics: dict[str, float] = {}
    for name, interval in judged["served"].items():
        metrics.update({name: interval.value, f"{name}_low": interval.low})
        metrics[f"{name}_high"] = interval.high
    behaviour: BehaviourResult | None = judged.get("behaviour")
    if behaviour is not None:
        metrics.update({f"unchanged.{n}": f for n, f in behaviour.unchanged.items()})
    comparison: Comparison | None = judged.get("comparison")
    if comparison is not None:
        metrics["champion_value"] = comparison.champion.value
        metrics["difference"] = comparison.difference.value
        metrics["difference_low"] = comparison.difference.low
        metrics["difference_high"] = comparison.difference.high
    return metrics
