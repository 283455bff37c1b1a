"""The judge card: a small file `her train genrm` writes beside a trained judge's weights.

It tells whoever serves the folder how the judge was trained to be prompted (a trained judge gets
the short prompt without the principle list) and on which principle library, so
`her serve --model DIR` and `her eval judge` pick the right prompt without being told.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ._judge import GenRMConfig
from ._templates import PrincipleDetail
from ._types import Mode

log = logging.getLogger(__name__)

JUDGE_CARD_FILE = "her_judge.json"


class JudgeCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    principle_detail: PrincipleDetail = "none"
    """How the compact template lists principles for this judge (trained judges: none)."""
    principle_set_hash: str
    """Version of the principle library the judge was trained on."""
    base_model: str
    modes: list[Mode] = Field(default_factory=lambda: ["cot", "fast"])
    swap: bool = True
    """Trained on both presentation orders of every pair."""
    train_pairs: int = 0

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / JUDGE_CARD_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


def read_judge_card(model: str | Path) -> JudgeCard | None:
    """The card of a model folder, or None for anything else (a bundled id, a hub name, a GGUF file)."""
    path = Path(model) / JUDGE_CARD_FILE
    if not path.is_file():
        return None
    return JudgeCard.model_validate_json(path.read_text(encoding="utf-8"))


def genrm_config_for(model: str | Path, principle_detail: PrincipleDetail | None = None,
                     library_version: str | None = None) -> GenRMConfig:
    """Judge settings for a model: an explicit `principle_detail` wins, then the model's card, then "id"."""
    card = read_judge_card(model)
    if card is not None and library_version and card.principle_set_hash != library_version:
        log.warning("judge %s was trained on principle set %s but the library served is %s: the ids it "
                    "learned may differ", model, card.principle_set_hash, library_version)
    detail = principle_detail or (card.principle_detail if card else "id")
    return GenRMConfig(principle_detail=detail)
