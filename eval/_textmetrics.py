"""Surface overlap of the re-enactment with the book's dialogue: BLEU (sacrebleu) and ROUGE-L
(rouge-score), both on a 0-100 scale, computed on the visible text (thoughts removed)."""

from __future__ import annotations

from functools import lru_cache

import sacrebleu
from rouge_score import rouge_scorer


def bleu(hypothesis: str, reference: str) -> float | None:
    """Sentence BLEU of the whole simulated dialogue against the original; None if either is empty."""
    if not hypothesis.strip() or not reference.strip():
        return None
    return round(float(sacrebleu.sentence_bleu(hypothesis, [reference]).score), 4)


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(hypothesis: str, reference: str) -> float | None:
    """ROUGE-L F1 x 100 of the simulated dialogue against the original; None if either is empty."""
    if not hypothesis.strip() or not reference.strip():
        return None
    return round(100.0 * _rouge().score(reference, hypothesis)["rougeL"].fmeasure, 4)
