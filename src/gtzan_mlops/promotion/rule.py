"""The promotion rule: pure functions of what the served models answered, so every branch is
tested without a registry.

The challenger takes the `champion` alias only when all of these hold:

1. **Behaviour**: on the test clips its genre stays the same under every transform of
   `promote.behaviour` (quieter, later, resampled, re-encoded) for at least `min_unchanged` of
   the clips. A model that fails is registered with the reason and never promoted, whatever
   its score.
2. **No leaked comparison**: the champion did not train on any of the current test clips (by the
   sha256 of their decoded samples, recorded with every version). If it did, its score on them
   means nothing, so nothing is compared and the challenger is not promoted on it.
3. **Better on the same clips**: both scored as served on the current test clips, the paired
   difference (challenger minus champion) is above 0 and at least `min_improvement`; with
   `require_significant`, the low end of its bootstrap interval is above 0 too. With no champion
   (or one that counts as absent because it cannot be loaded) this step passes.

The gate is the costly part (each test clip played once per transform), and it can only turn a
yes into a no: judgement.py measures it only when steps 2 and 3 would promote, so a challenger
they keep out is reported on them, its behaviour not measured.

The same classifier served by new code or settings is not a new model: it takes the alias when
it does no worse on the same clips (the serving code changed on purpose).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gtzan_mlops.evaluation.uncertainty import Interval

# Scores are means over a few songs: two equal ones computed in another order can differ in the
# last bits, and 0.85 - 0.80 < 0.05 in floating point. Differences within this are ties.
SCORE_TOLERANCE = 1e-9
NO_CHAMPION = "first model: there was no champion yet"


@dataclass(frozen=True)
class Comparison:
    """Challenger and champion on the same test clips, as served."""

    metric: str  # song_accuracy or song_macro_f1
    champion_version: str
    challenger: Interval
    champion: Interval
    difference: Interval  # challenger - champion, paired over the same resampled units

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "champion_version": self.champion_version,
            "challenger": self.challenger.to_dict(),
            "champion": self.champion.to_dict(),
            "difference": self.difference.to_dict(),
        }


@dataclass(frozen=True)
class BehaviourResult:
    """The share of test clips whose served genre a transform left unchanged, per transform."""

    min_unchanged: float
    unchanged: dict[str, float]  # transform name -> fraction
    descriptions: dict[str, str] = field(default_factory=dict)  # transform name -> words

    @property
    def failed(self) -> list[str]:
        return [
            name
            for name, fraction in self.unchanged.items()
            if fraction < self.min_unchanged - SCORE_TOLERANCE
        ]

    def to_dict(self) -> dict[str, object]:
        return {
            "min_unchanged": self.min_unchanged,
            "unchanged": dict(self.unchanged),
            "passed": not self.failed,
        }


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    rule: str  # which part of the rule decided: behaviour, first, leakage, same_classifier, ...


def leaked_clips(
    champion_training: set[str] | None, test_hashes: dict[str, str]
) -> list[str] | None:
    """The test clips (track ids, sorted) whose samples' sha256 is among the champion's training
    clips; None when the champion recorded no training clips (registered before they were)."""
    if champion_training is None:
        return None
    return sorted(track for track, digest in test_hashes.items() if digest in champion_training)


def apply_gate(behaviour: BehaviourResult, decision: Decision) -> Decision:
    """Step 1 on what the clips decided: a challenger that fails the behavioural gate is not
    promoted, whatever its score. The gate can only turn a yes into a no, so a no stands."""
    failure = behaviour_failure(behaviour)
    if decision.promote and failure:
        return Decision(False, f"{failure}; not promoted", "behaviour")
    return decision


def behaviour_failure(behaviour: BehaviourResult) -> str | None:
    failed = behaviour.failed
    if not failed:
        return None
    shown = ", ".join(
        f"{behaviour.descriptions.get(name, name)} {behaviour.unchanged[name]:.2f}"
        for name in failed
    )
    return (
        f"failed the behavioural gate: the genre stayed the same on too few test clips "
        f"({shown}; min_unchanged {behaviour.min_unchanged:g})"
    )


def decide_on_the_clips(
    comparison: Comparison | None,
    min_improvement: float,
    require_significant: bool,
    leaked: Sequence[str] | None = (),
    same_classifier: bool = False,
    no_champion_reason: str = NO_CHAMPION,
) -> Decision:
    """The rule without the behavioural gate (steps 2 and 3): what the comparison with the
    champion on the same clips decides (`apply_gate` then adds step 1 to a yes).

    `comparison` is None when there is no champion to compare with (`no_champion_reason` says
    why); `leaked` lists the test clips the champion trained on.
    """
    if min_improvement < 0:
        raise ValueError("promote.min_improvement must not be negative")
    if comparison is None:
        return Decision(True, no_champion_reason, "first")
    version = comparison.champion_version
    if leaked:
        shown = ", ".join(leaked[:10]) + (
            f" and {len(leaked) - 10} more" if len(leaked) > 10 else ""
        )
        return Decision(
            False,
            f"champion version {version} was trained on {len(leaked)} of the current test clips "
            f"({shown}), so its score on them is not comparable; champion kept (move the alias "
            "by hand, or choose a split whose test clips it has not seen)",
            "leakage",
        )
    difference = comparison.difference
    metric = comparison.metric
    measured = (
        f"{metric} {comparison.challenger.value:.4f} vs {comparison.champion.value:.4f} on "
        f"{difference.n_units} test units, difference {difference.value:+.4f} "
        f"[{difference.low:+.4f}, {difference.high:+.4f}]"
    )
    if same_classifier:
        if difference.value >= -SCORE_TOLERANCE:
            return Decision(
                True,
                f"the classifier of champion version {version} with new serving code or "
                f"settings, no worse on the same test clips ({measured})",
                "same_classifier",
            )
        return Decision(
            False,
            f"the classifier of champion version {version} with new serving code or settings "
            f"does worse on the same test clips ({measured}); champion kept",
            "same_classifier",
        )
    better = difference.value > SCORE_TOLERANCE
    enough = difference.value >= min_improvement - SCORE_TOLERANCE
    significant = difference.low > SCORE_TOLERANCE
    if better and enough and (significant or not require_significant):
        return Decision(
            True,
            f"better than champion version {version} on the same test clips ({measured}; "
            f"min_improvement {min_improvement:g}"
            + (", interval above 0" if require_significant else "")
            + ")",
            "improvement",
        )
    if better and enough:
        why = "the difference's interval does not lie above 0 (require_significant)"
    else:
        why = f"not better by more than 0 and at least min_improvement {min_improvement:g}"
    return Decision(
        False,
        f"{why} than champion version {version} on the same test clips ({measured}); champion kept",
        "improvement",
    )
