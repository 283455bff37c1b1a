"""Shared-prompt-prefix KV reuse for the transformers engine.

Judge batches send many prompts that open with the same long system prompt. The store runs such a
common token prefix through the model once (batch 1), keeps its per-layer keys and values, and hands
out fresh copies repeated for a batch, so each row only computes its own suffix. A few recent
prefixes are kept across calls (LRU), so a later call with the same system prompt skips it entirely.

Only plain full-attention caches (every layer a ``DynamicLayer``) are reused: sliding-window or
linear-attention layers keep extra state a copied prefix would not carry, so for such models the
store switches itself off and the engine falls back to full prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_PREFIX_TOKENS = 64  # below this, a separate prefix forward saves too little to pay for itself
PREFIX_ENTRIES = 4


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token of every row after it
    (the suffix forward must produce each row's next-token logits)."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows[1:]):
        n += 1
    return max(n, 0)


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of one prompt prefix at batch 1. Never mutated: callers get `fork` copies."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __len__(self) -> int:
        return len(self.ids)

    def fork(self, rows: int) -> DynamicCache:
        """A new cache holding this prefix once per row, in tensors of its own.

        `DynamicLayer.update` concatenates onto an empty tensor, so the expanded views are copied
        there: whatever generation later does to the fork cannot touch the stored prefix.
        """
        return DynamicCache(
            [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers]
        )


class PrefixStore:
    """Computes, keeps (LRU) and serves shared prompt prefixes for one model.

    Call it from the engine's worker thread only (no locking of its own). `rows_served` and
    `tokens_served` count the rows that started from a stored prefix and the prompt tokens those rows
    did not recompute (observability and tests).
    """

    def __init__(self, model: Any, *, entries: int = PREFIX_ENTRIES, min_tokens: int = MIN_PREFIX_TOKENS) -> None:
        self.model = model
        self.entries = entries
        self.min_tokens = min_tokens
        self.supported = True  # set False the first time the model's cache turns out not reusable
        self._store: OrderedDict[tuple[int, ...], PrefixKV] = OrderedDict()
        self.rows_served = 0
        self.tokens_served = 0

    def clear(self) -> None:
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)

    def for_rows(self, rows: Sequence[Sequence[int]]) -> PrefixKV | None:
        """The prefix to reuse for `rows` (token id lists), or None to run them in full.

        Several rows sharing at least `min_tokens` leading tokens get their whole common prefix,
        computed now (on top of the longest stored prefix of it, if any) and stored. A single row only
        gets a stored prefix: computing one just for itself would save nothing.
        """
        if not self.supported or not rows:
            return None
        common = common_prefix_len(rows)
        hit = self._lookup(rows[0], common)
        if len(rows) >= 2 and common >= self.min_tokens and (hit is None or len(hit) < common):
            prefix = self._compute(tuple(rows[0][:common]), hit)
            if prefix is None:
                return None
        else:
            prefix = hit
        if prefix is not None:
            self._store.move_to_end(prefix.ids)
            self.rows_served += len(rows)
            self.tokens_served += len(prefix) * len(rows)
        return prefix

    def _lookup(self, ids: Sequence[int], limit: int) -> PrefixKV | None:
        """The longest stored prefix of `ids` that is at most `limit` tokens long."""
        best = None
        for key, entry in self._store.items():
            if len(key) <= limit and (best is None or len(key) > len(best)) and tuple(ids[: len(key)]) == key:
                best = entry
        return best

    def _compute(self, ids: tuple[int, ...], base: PrefixKV | None) -> PrefixKV | None:
        start = len(base) if base is not None else 0
        feed = torch.tensor([ids[start:]], dtype=torch.long, device=self.model.device)
        positions = torch.arange(start, len(ids), device=self.model.device).unsqueeze(0)
        out = self.model(
            input_ids=feed,
            position_ids=positions,
            past_key_values=base.fork(1) if base is not None else None,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        layers = getattr(cache, "layers", None)
        if not isinstance(cache, DynamicCache) or not layers or any(type(la) is not DynamicLayer for la in layers):
            self.supported = False
            self._store.clear()
            return None
        prefix = PrefixKV(ids=ids, layers=tuple((la.keys, la.values) for la in layers))
        if any(k.shape[0] != 1 or k.shape[-2] != len(ids) for k, _ in prefix.layers):
            self.supported = False  # a layer that does not keep every position (e.g. shared KV)
            self._store.clear()
            return None
        self._store[ids] = prefix
        while len(self._store) > self.entries:
            self._store.popitem(last=False)
        return prefix
