"""The judge card: a small file `her train genrm` writes beside a trained judge's weights.

It tells whoever serves the folder how the judge was trained to be prompted (a trained judge gets
the short prompt without the principle list) and on which principle library, so every
path that judges with the folder (`build_genrm`) picks the right prompt without being told.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

from pydantic import BaseModel, ConfigDict, Field

from her_engines import Engine
from her_roleplay import PrincipleLibrary, default_library

from ._judge import GenRM, GenRMConfig
from ._templates import HerRMStage, HerRMTemplate, PrincipleDetail
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
    modes: list[Mode] = Field(default_factory=lambda: list(get_args(Mode)))
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


def build_genrm(
    engine: Engine,
    model: str | Path | None = None,
    *,
    principles: str | Path | PrincipleLibrary | None = None,
    principle_detail: PrincipleDetail | None = None,
    her_rm_template: str | Path | None = None,
    her_rm_stage: HerRMStage = "sft",
) -> GenRM:
    """The judge for `model` (default: the engine's model) on `engine`, as every path builds it (`her serve`,
    `her judge`, `her eval judge`, `her_genrm.judge()`): the model folder's judge card read, so a judge trained
    by `her train genrm` gets the prompt it was trained with; the principle library (a YAML path, a library, or
    None: the bundled one); the her-rm template file and stage when given. An explicit `principle_detail` wins
    over the card; without either the compact prompt lists principle ids."""
    if isinstance(principles, PrincipleLibrary):
        library = principles
    else:
        library = PrincipleLibrary.load(principles) if principles else default_library()
    model = model if model is not None else engine.model_id
    card = read_judge_card(model)
    if card is not None and card.principle_set_hash != library.version:
        log.warning("judge %s was trained on principle set %s but the library served is %s: the ids it "
                    "learned may differ", model, card.principle_set_hash, library.version)
    detail = principle_detail or (card.principle_detail if card else "id")
    return GenRM(engine=engine, library=library, config=GenRMConfig(principle_detail=detail),
                 her_rm_template=HerRMTemplate.load(her_rm_template, her_rm_stage) if her_rm_template else None)
