"""The order-consistency term of `her train genrm` (``consistency_weight``).

A judge trained with cross-entropy on both presentation orders can still fit each order on its own and
keep a slot preference: the two orders of one pair then disagree, which our own telemetry
(`rm_swap_consistency_ratio`) flags. The term below is J1's verdict-consistency idea as a loss: the
fast verdict of a pair in one order, read in a/b terms, should be the same distribution as in the other
order. It is the Jensen–Shannon divergence of the two, averaged over the pairs whose two fast rows share
a batch (`shuffled_by_pair` and the sequential sampler put them there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

PAIR_COLUMNS = ("pair_index", "a_first")
"""Dataset columns the term reads: the pair a fast row belongs to (-1: not a fast row) and its order."""


def in_ab_terms(slot_logprobs: torch.Tensor, a_first: torch.Tensor) -> torch.Tensor:
    """(rows, 3) log-probabilities over the slots A, B, tie → over the winners a, b, tie."""
    swapped = slot_logprobs[:, [1, 0, 2]]
    return torch.where(a_first[:, None].bool(), slot_logprobs, swapped)


def order_divergence(winner_logprobs: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor | None:
    """Mean Jensen–Shannon divergence between the two orders of every pair with exactly two rows here;
    None when no pair has both orders in this batch."""
    firsts, seconds = [], []
    for index in pair_index.unique().tolist():
        if index < 0:
            continue
        rows = (pair_index == index).nonzero().flatten()
        if len(rows) == 2:
            firsts.append(rows[0])
            seconds.append(rows[1])
    if not firsts:
        return None
    p, q = winner_logprobs[torch.stack(firsts)], winner_logprobs[torch.stack(seconds)]
    mean = torch.logsumexp(torch.stack([p, q]), dim=0) - torch.log(torch.tensor(2.0))
    js = 0.5 * (F.kl_div(mean, p, log_target=True, reduction="none").sum(-1)
                + F.kl_div(mean, q, log_target=True, reduction="none").sum(-1))
    return js.mean()


class _KeepPairColumns:
    """TRL's collator pads what the model reads; this one also passes the pair columns through."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        for column in PAIR_COLUMNS:
            batch[column] = torch.tensor([int(e[column]) for e in examples])
        return batch


def order_consistent_trainer(weight: float, verdict_token_ids: Sequence[int]) -> type:
    """An SFTTrainer whose loss is the completion cross-entropy plus ``weight`` × the order divergence of the
    fast verdicts (read at each fast row's first completion token, over the verdict tokens A, B, tie)."""
    from trl import SFTTrainer

    verdict_ids = torch.tensor(list(verdict_token_ids))

    class OrderConsistentSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.data_collator = _KeepPairColumns(self.data_collator)
            self._head_checked = False

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            columns: list[str] = list(self._signature_columns or [])
            self._signature_columns = [*columns, *PAIR_COLUMNS]  # type: ignore[assignment]  # typed None upstream

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            pair_index, a_first = inputs.pop("pair_index"), inputs.pop("a_first")
            labels = inputs.pop("labels")
            # logits only where they are read: the full (batch, length, vocabulary) tensor would be most of the step
            outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            hidden = outputs.hidden_states[-1]
            head = model.get_output_embeddings()
            if not self._head_checked:  # the last hidden state must be what the head reads (after the final norm)
                if not torch.allclose(head(hidden[:, -1]).float(), outputs.logits[:, -1].float(), atol=1e-3, rtol=1e-3):
                    raise RuntimeError("consistency_weight: this model's last hidden state is not the LM head's "
                                       "input; train it with consistency_weight: 0")
                self._head_checked = True
            predicts = labels[:, 1:] != -100
            targets = labels[:, 1:][predicts]
            token_logits = head(hidden[:, :-1][predicts]).float()
            n_tokens = num_items_in_batch if num_items_in_batch is not None else targets.numel()
            loss = F.cross_entropy(token_logits, targets, reduction="sum") / torch.as_tensor(n_tokens).clamp(min=1)

            fast = pair_index >= 0
            first = predicts.int().argmax(dim=1)  # each row's first completion position
            first_tokens = labels[torch.arange(len(labels)), first + 1]
            if bool((~torch.isin(first_tokens[fast], verdict_ids.to(labels.device))).any()):
                raise RuntimeError("a fast row's completion does not start with a verdict token")
            rows = fast.nonzero().flatten()
            if len(rows):
                verdict_logits = head(hidden[rows, first[rows]])[:, verdict_ids.to(labels.device)].float()
                winners = in_ab_terms(verdict_logits.log_softmax(-1), a_first[rows])
                divergence = order_divergence(winners, pair_index[rows])
                if divergence is not None:
                    loss = loss + weight * divergence
                    self._metrics["train"]["order_divergence"].append(divergence.item())
            return (loss, outputs) if return_outputs else loss

    return OrderConsistentSFTTrainer
