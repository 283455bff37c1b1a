"""Admission control mechanisms (token bucket, fair share) on a fake clock, and auth/error mapping on the app."""

from __future__ import annotations

import logging

import httpx
import pytest
from _servers import serve_app

from rm_server import ServerSettings, build_app
from rm_server._admission import Admission, RateLimited, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_its_rate_and_says_how_long_to_wait():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=4.0, clock=clock)
    assert bucket.take(4) == 0.0  # a full burst at once
    assert bucket.take(1) == pytest.approx(0.5)  # empty: one token comes in 0.5 s
    clock.t += 1.0
    assert bucket.take(2) == 0.0
    assert bucket.take(1) == pytest.approx(0.5)


def test_rate_limit_is_per_client_with_retry_after():
    admission = Admission(rate_per_s=1.0, burst=2, max_queue=100, capacity=100, fair_share=False)
    with admission.admit("key:hog", 2, queue_depth=0):
        pass
    with pytest.raises(RateLimited) as refused:
        with admission.admit("key:hog", 1, queue_depth=0):
            pass
    assert refused.value.retry_after_header == "1"
    with admission.admit("key:polite", 2, queue_depth=0):  # another client has its own bucket
        pass
    with pytest.raises(RateLimited, match="split the request"):
        with admission.admit("key:polite", 3, queue_depth=0):
            pass


def test_fair_share_refuses_the_client_holding_more_than_its_share_under_overload():
    admission = Admission(rate_per_s=0, burst=None, max_queue=8, capacity=8, fair_share=True)
    with admission.admit("key:hog", 4, queue_depth=0):  # below half full: anything goes
        with admission.admit("key:hog", 3, queue_depth=4):  # over half full, but alone: the queue bound rules
            with pytest.raises(RateLimited, match="fair share"):
                with admission.admit("key:other", 5, queue_depth=7):  # 2 clients: 4 each
                    pass
            with admission.admit("key:other", 1, queue_depth=7):
                with pytest.raises(RateLimited, match="fair share"):  # the hog, over its 4 of 8
                    with admission.admit("key:hog", 1, queue_depth=7):
                        pass
    assert not admission._held  # every hold released


@pytest.mark.model
def test_probes_need_no_key_docs_do_and_internal_errors_are_500(engine, caplog):
    settings = ServerSettings.load(api_keys="secret-key", request_timeout_s=600.0)
    app = build_app(settings, engine=engine)
    auth = {"Authorization": "Bearer secret-key"}
    with serve_app(app) as base:
        assert httpx.get(base + "/healthz").status_code == 200
        assert httpx.get(base + "/readyz").status_code == 200
        assert httpx.get(base + "/openapi.json").status_code == 401
        assert httpx.get(base + "/docs").status_code == 401
        assert httpx.get(base + "/openapi.json", headers=auth).json()["info"]["title"] == "HER GenRM service"
        assert httpx.get(base + "/docs", headers=auth).status_code == 200

        def broken(*args, **kwargs):
            raise ValueError("a bug inside the service")

        app.state.service.rewards = broken
        with caplog.at_level(logging.ERROR, logger="rm_server"):
            r = httpx.post(base + "/v1/rewards", headers=auth, json={
                "prompts": ["User: hi"], "completions": ["Hello!"], "references": ["Hi."]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        assert "a bug inside the service" not in r.text  # details stay in the log
        assert "a bug inside the service" in caplog.text
        assert "secret-key" not in caplog.text
