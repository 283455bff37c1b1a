"""How well a judge agrees with labelled pairs, and how it is biased: pure functions of verdicts.

Every metric is a `Rate` (hits out of counted), with a 95% Wilson interval. A rate that counted nothing
has value None ("no data"), never 0. Judge errors are their own count: the main accuracy is over the
pairs judged ok, and `accuracy_errors_as_wrong` shows what the errors would cost.

Definitions (a/b name the caller's candidates, never presentation slots):

- accuracy: verdict == label, over ok verdicts (a label may be ``tie``).
- swap consistency: ok verdicts whose two presentation orders agree (judged with swap).
- first-slot win rate: over single orders that answered ok with a non-tie winner, the share where the
  winner was the candidate shown first (ideal 0.5).
- prefer-longer rate: over ok non-tie verdicts of pairs whose candidates differ in length (characters),
  the share that picked the longer one.
- tie rate: ok verdicts that are ties.
- errors: pairs whose verdict has status ``error`` (unparsable output, engine failure), over all pairs.
- calibration: over ok verdicts of pairs labelled ``a`` or ``b``, how well P(a≻b) (``p_a``) matches how
  often ``a`` is the label: a reliability curve (equal-width bins of p_a: mean p_a against the share
  labelled ``a``), the expected calibration error (ECE: the bins' |observed − predicted| weighted by
  their counts) and the Brier score (mean squared error of p_a).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from her_genrm import LabelledPair, Verdict

Z95 = 1.959963984540054
NO_GROUP = "none"  # the group of pairs without a flaw kind (teacher pairs) or label pattern


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion; None when nothing was counted."""
    if n < 0 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n, got hits={hits}, n={n}")
    if n == 0:
        return None
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # min/max: rounding would otherwise leave p a hair outside its own interval at 0 and 1
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    """`hits` out of `n` counted cases."""

    hits: int
    n: int

    @property
    def value(self) -> float | None:
        return self.hits / self.n if self.n else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        return wilson_interval(self.hits, self.n)

    def to_dict(self) -> dict[str, Any]:
        ci = self.ci95
        return {"value": self.value, "hits": self.hits, "n": self.n, "ci95": list(ci) if ci else None}


def rate(items: Sequence[Any], hit: Callable[[Any], bool]) -> Rate:
    return Rate(sum(1 for x in items if hit(x)), len(items))


def _ok(verdicts: Sequence[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.status == "ok" and v.verdict is not None]


def accuracy(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict]) -> Rate:
    """verdict == label over the pairs judged ok."""
    judged = [(p, v) for p, v in zip(pairs, verdicts, strict=True) if v.status == "ok" and v.verdict is not None]
    return rate(judged, lambda pv: pv[1].verdict == pv[0].label)


def accuracy_errors_as_wrong(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict]) -> Rate:
    """verdict == label over all pairs; an error counts as a wrong answer."""
    all_pairs = list(zip(pairs, verdicts, strict=True))
    return rate(all_pairs, lambda pv: pv[1].status == "ok" and pv[1].verdict == pv[0].label)


def _groups(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict], key: Callable[[LabelledPair], str | None],
            ) -> dict[str, tuple[list[LabelledPair], list[Verdict]]]:
    groups: dict[str, tuple[list[LabelledPair], list[Verdict]]] = {}
    for p, v in zip(pairs, verdicts, strict=True):
        ps, vs = groups.setdefault(key(p) or NO_GROUP, ([], []))
        ps.append(p)
        vs.append(v)
    return {name: groups[name] for name in sorted(groups)}


def accuracy_by(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict],
                key: Callable[[LabelledPair], str | None]) -> dict[str, Rate]:
    """Accuracy per group of pairs (groups sorted by name; a missing key is the group ``none``)."""
    return {name: accuracy(ps, vs) for name, (ps, vs) in _groups(pairs, verdicts, key).items()}


def family_metrics(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict]) -> dict[str, dict[str, Any]]:
    """Per pair family (``source``: hard_negative, teacher, policy_sample, wrong_moment): accuracy, swap
    consistency and first-slot win rate, each with its 95% interval. A judge must hold on every family."""
    return {
        name: {"accuracy": accuracy(ps, vs).to_dict(), "swap_consistency": swap_consistency(vs).to_dict(),
               "first_slot_win_rate": first_slot_win_rate(vs).to_dict()}
        for name, (ps, vs) in _groups(pairs, verdicts, lambda p: p.source).items()
    }


def worst_family(families: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The family with the lowest accuracy (the headline of a judge: the average hides where it fails)."""
    scored = [(f["accuracy"]["value"], name) for name, f in families.items() if f["accuracy"]["value"] is not None]
    if not scored:
        return None
    value, name = min(scored)
    return {"family": name, **families[name]["accuracy"]}


def swap_consistency(verdicts: Sequence[Verdict]) -> Rate:
    """Ok verdicts whose presentation orders agree (verdicts judged in one order do not count)."""
    return rate([v for v in _ok(verdicts) if v.consistent is not None], lambda v: bool(v.consistent))


def first_slot_win_rate(verdicts: Sequence[Verdict]) -> Rate:
    """Single orders with an ok, non-tie answer whose winner was shown first."""
    orders = [o for v in verdicts for o in v.orders if o.status == "ok" and o.winner in ("a", "b")]
    # winners are a/b; the winner sat in the first slot iff (winner is a) == a_first
    return rate(orders, lambda o: (o.winner == "a") == o.a_first)


def prefer_longer_rate(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict]) -> Rate:
    """Ok non-tie verdicts, over pairs of unequal length, that picked the longer candidate."""
    decided = [(p, v) for p, v in zip(pairs, verdicts, strict=True)
               if v.status == "ok" and v.verdict in ("a", "b") and len(p.a) != len(p.b)]
    return rate(decided, lambda pv: (pv[1].verdict == "a") == (len(pv[0].a) > len(pv[0].b)))


def tie_rate(verdicts: Sequence[Verdict]) -> Rate:
    return rate(_ok(verdicts), lambda v: v.verdict == "tie")


def error_rate(verdicts: Sequence[Verdict]) -> Rate:
    """Pairs the judge could not decide (parse failure, engine error), over all pairs."""
    return rate(list(verdicts), lambda v: v.status != "ok" or v.verdict is None)


CALIBRATION_BINS = 10


def calibration(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict], bins: int = CALIBRATION_BINS,
                ) -> dict[str, Any]:
    """Reliability of P(a≻b) against the labels (see the module doc); ECE and Brier None without data."""
    points = [(v.p_a, 1.0 if p.label == "a" else 0.0) for p, v in zip(pairs, verdicts, strict=True)
              if v.status == "ok" and v.p_a is not None and p.label in ("a", "b")]
    curve = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        inside = [(x, y) for x, y in points if lo <= x < hi or (k == bins - 1 and x == 1.0)]
        if inside:
            curve.append({"lo": lo, "hi": hi, "n": len(inside),
                          "mean_p": sum(x for x, _ in inside) / len(inside),
                          "observed": sum(y for _, y in inside) / len(inside)})
    n = len(points)
    return {
        "n": n,
        "ece": sum(b["n"] * abs(b["observed"] - b["mean_p"]) for b in curve) / n if n else None,
        "brier": sum((x - y) ** 2 for x, y in points) / n if n else None,
        "bins": curve,
    }


def agreement_metrics(pairs: Sequence[LabelledPair], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Every metric of one judge on `pairs` (``verdicts[i]`` judges ``pairs[i]``), JSON-ready."""
    if len(pairs) != len(verdicts):
        raise ValueError(f"{len(pairs)} pairs but {len(verdicts)} verdicts")
    return {
        "pairs": len(pairs),
        "judged_ok": len(_ok(verdicts)),
        "accuracy": accuracy(pairs, verdicts).to_dict(),
        "accuracy_errors_as_wrong": accuracy_errors_as_wrong(pairs, verdicts).to_dict(),
        "swap_consistency": swap_consistency(verdicts).to_dict(),
        "first_slot_win_rate": first_slot_win_rate(verdicts).to_dict(),
        "prefer_longer_rate": prefer_longer_rate(pairs, verdicts).to_dict(),
        "tie_rate": tie_rate(verdicts).to_dict(),
        "errors": error_rate(verdicts).to_dict(),
        "by_family": (families := family_metrics(pairs, verdicts)),
        "worst_family": worst_family(families),
        "by_flaw_kind": {k: r.to_dict() for k, r in accuracy_by(pairs, verdicts, lambda p: p.flaw_kind).items()},
        "by_pattern": {k: r.to_dict() for k, r in accuracy_by(pairs, verdicts, lambda p: p.pattern).items()},
        "calibration": calibration(pairs, verdicts),
    }
