"""Session-wide fixtures: the real bundled model loaded once, the fixture scene, real Redis."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

# A copy of the real CoSER sample from shared/fixtures, unchanged, so the suite is self-contained.
FIXTURES = Path(__file__).resolve().parent / "data"
SCENE_FILE = FIXTURES / "coser_test_sample_pride_and_prejudice.json"
REDIS_URL = os.environ.get("HER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def scene_file() -> Path:
    return SCENE_FILE


@pytest.fixture(scope="session")
def scene_dict() -> dict:
    return json.loads(SCENE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def scene():
    from her_roleplay import load_scenes

    return load_scenes(SCENE_FILE)[0]


@pytest.fixture(scope="session")
def engine():
    """The real SmolLM2-135M-Instruct on the transformers engine, loaded once per session."""
    from her_engines import create_engine

    eng = create_engine("transformers")
    yield eng


@pytest.fixture(scope="session")
def genrm(engine):
    from her_genrm import GenRM

    return GenRM(engine)


@pytest.fixture
def redis_url() -> str:
    """The machine's shared Redis (never flushed or stopped by tests)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:  # make test starts it; say so instead of failing obscurely
        pytest.fail(f"Redis at {REDIS_URL} is not answering ({exc}); `make redis` starts it")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]
