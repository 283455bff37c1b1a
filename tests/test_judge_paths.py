"""One builder for the judge of a model folder (`build_genrm`): every path that judges with the folder reads its
judge card and sends the prompt the judge was trained with. Nothing is trained: a card is written into a copy
of the bundled model's folder, and the paths judge one pair (fast, one order) on the transformers engine,
whose prompt token counts then say which prompt each sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from _openai_server import ServerProcess
from _pairs import fixture_pairs
from _servers import free_port

import her_genrm
from her_engines import create_engine, ensure_hf_folder
from her_genrm import JudgeCard
from her_roleplay import default_library

HER = Path(sys.executable).with_name("her")
CALL_S = 600.0  # hang guard for a model load plus one judgment on a slow, busy box


@pytest.fixture(scope="module")
def carded_folder(tmp_path_factory) -> Path:
    """The bundled model's HF folder (files linked, not copied) with a card: a judge trained without the
    principle list in its prompt."""
    source = ensure_hf_folder("smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("carded") / "judge"
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).symlink_to(f)
    JudgeCard(principle_detail="none", principle_set_hash=default_library().version,
              base_model="smollm2-135m-instruct").write(folder)
    return folder


@pytest.fixture(scope="module")
def pair(scene) -> dict:
    p = fixture_pairs(scene, 1)[0]
    return {"context": [m.model_dump() for m in p["context"]], "a": p["a"], "b": p["b"]}


def _prompt_tokens(verdict: dict) -> int:
    assert verdict["status"] == "ok", verdict
    return verdict["usage"]["prompt_tokens"]


@pytest.mark.model
async def test_every_path_sends_a_carded_folder_the_prompt_it_was_trained_with(carded_folder, pair, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    engine_args = ["--engine", "transformers", "--threads", "1"]

    # her_genrm.judge(): the library, on an engine over the folder
    engine = create_engine("transformers", model=str(carded_folder), threads=1)
    try:
        [library] = await her_genrm.judge([pair], mode="fast", swap=False, engine=engine, model=carded_folder)
        [uncarded] = await her_genrm.judge([pair], mode="fast", swap=False, engine=engine, model="no-card")
    finally:
        await engine.aclose()
    sent = {"her_genrm.judge()": _prompt_tokens(library.model_dump())}

    # her judge
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(pair) + "\n")
    out = tmp_path / "verdicts.jsonl"
    done = subprocess.run([str(HER), "judge", "--in", str(pairs), "--out", str(out), "--mode", "fast", "--no-swap",
                           "--model", str(carded_folder), *engine_args], env=env, capture_output=True, text=True,
                          timeout=CALL_S)
    assert done.returncode == 0, done.stderr[-3000:]
    sent["her judge"] = _prompt_tokens(json.loads(out.read_text().splitlines()[0]))

    # her eval judge
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"id": "p1", **pair, "label": "a", "source": "hard_negative"}) + "\n")
    report = tmp_path / "eval"
    done = subprocess.run([str(HER), "eval", "judge", "--pairs", str(labelled), "--judge", f"carded={carded_folder}",
                           "--mode", "fast", "--no-swap", "--out", str(report), "--no-progress", *engine_args],
                          env=env, capture_output=True, text=True, timeout=CALL_S)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = (report / "verdicts_carded.jsonl").read_text().splitlines()
    sent["her eval judge"] = _prompt_tokens(json.loads(row)["verdict"])

    # her serve
    port = free_port()
    server = ServerProcess([str(HER), "serve", "--port", str(port), "--model", str(carded_folder), *engine_args],
                           port, ready_path="/readyz", startup_timeout=CALL_S, env=env)
    server.start()
    try:
        r = httpx.post(server.base_url + "/v1/judge", json={**pair, "mode": "fast", "swap": False}, timeout=CALL_S)
        assert r.status_code == 200, r.text
        sent["her serve"] = _prompt_tokens(r.json())
    finally:
        server.stop()

    assert len(set(sent.values())) == 1, sent
    # ... and that prompt is the trained judge's short one, not the one that lists the principles
    assert sent["her serve"] < _prompt_tokens(uncarded.model_dump()), (sent, uncarded.usage)
