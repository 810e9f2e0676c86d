"""Tests for the scriptable fake OpenAI server, driven by the real openai client."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.fakes.openai_server import NO_REPLY_MESSAGE, FakeOpenAI

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture
def srv():
    with FakeOpenAI() as server:
        server.allow_uncapped()  # these tests check the fake itself; test_requests_need_a_cap checks the default
        yield server


def client(srv: FakeOpenAI, **kw) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=srv.base_url, api_key="test", **kw)


def test_base_url_and_models(srv: FakeOpenAI) -> None:
    assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
    assert [m.id for m in client(srv).models.list()] == ["fake-model"]


def test_reply_content_and_usage(srv: FakeOpenAI) -> None:
    srv.reply("hi!", prompt_tokens=7, completion_tokens=3)
    r = client(srv).chat.completions.create(model="m1", messages=MSGS)
    assert r.choices[0].message.content == "hi!"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "m1"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 3, 10)
    assert srv.remaining() == 0


def test_default_usage_and_reply_json(srv: FakeOpenAI) -> None:
    srv.reply_json({"a": 1})
    r = client(srv).chat.completions.create(model="m", messages=MSGS)
    assert json.loads(r.choices[0].message.content) == {"a": 1}
    assert r.usage.prompt_tokens == len("be brief" + "hello there") // 4
    assert r.usage.completion_tokens == max(1, len('{"a": 1}') // 4)


def test_requests_are_recorded(srv: FakeOpenAI) -> None:
    srv.reply("ok")
    fmt = {"type": "json_object"}
    client(srv).chat.completions.create(model="m2", messages=MSGS, response_format=fmt)
    (rec,) = srv.requests
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer test"
    assert rec.body == json.loads(rec.raw)
    assert rec.body["messages"] == MSGS and rec.body["model"] == "m2"
    assert rec.body["response_format"] == fmt
    assert rec.response_status == 200
    assert json.loads(rec.response_body)["choices"][0]["message"]["content"] == "ok"
    assert srv.chat_requests() == [rec.body]


def test_error_then_retry_succeeds(srv: FakeOpenAI) -> None:
    srv.error(500, "boom", headers={"Retry-After-Ms": "1"}).reply("recovered")
    r = client(srv, max_retries=1).chat.completions.create(model="m", messages=MSGS)
    assert r.choices[0].message.content == "recovered"
    assert [q.response_status for q in srv.requests] == [500, 200]
    assert json.loads(srv.requests[0].response_body)["error"]["message"] == "boom"


def test_error_headers_and_status_class(srv: FakeOpenAI) -> None:
    srv.error(429, "slow down", headers={"Retry-After": "0"})
    with pytest.raises(openai.RateLimitError) as ei:
        client(srv).chat.completions.create(model="m", messages=MSGS)
    assert ei.value.response.headers["retry-after"] == "0"
    assert ei.value.body["message"] == "slow down"


def test_reject_response_format_keeps_queue(srv: FakeOpenAI) -> None:
    srv.reject_response_format("json_schema")
    srv.reply("later")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="response_format type json_schema is not supported"):
        client(srv).chat.completions.create(model="m", messages=MSGS, response_format=fmt)
    assert srv.remaining() == 1
    assert len(srv.chat_requests()) == 1
    r = client(srv).chat.completions.create(model="m", messages=MSGS, response_format={"type": "json_object"})
    assert r.choices[0].message.content == "later"


def test_stream_is_rejected_when_told(srv: FakeOpenAI) -> None:
    srv.without_streaming().reply("unused")
    with pytest.raises(openai.BadRequestError):
        client(srv).chat.completions.create(model="m", messages=MSGS, stream=True)
    assert srv.remaining() == 1


def test_requests_need_a_cap() -> None:
    with FakeOpenAI() as srv:
        srv.reply("a").reply("b")
        with pytest.raises(openai.BadRequestError, match="no reply cap"):
            client(srv).chat.completions.create(model="m", messages=MSGS)
        r = client(srv).chat.completions.create(model="m", messages=MSGS, max_tokens=5)
        assert r.choices[0].message.content == "a"
        r = client(srv).chat.completions.create(model="m", messages=MSGS, max_completion_tokens=5)
        assert r.choices[0].message.content == "b"


def test_stream_sends_tokens_finish_and_usage(srv: FakeOpenAI) -> None:
    srv.reply("hello world, streamed", prompt_tokens=9)
    chunks = list(client(srv).chat.completions.create(model="m", messages=MSGS, stream=True,
                                                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello world, streamed"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.prompt_tokens == 9 and chunks[-1].usage.completion_tokens == 6  # 4 characters a token
    srv.without_stream_usage().reply("no usage")
    chunks = list(client(srv).chat.completions.create(model="m", messages=MSGS, stream=True,
                                                       stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks)


def test_runaway_reply_is_cut_at_the_cap(srv: FakeOpenAI) -> None:
    srv.writing('{"a": "', repeat="dolam_")
    r = client(srv).chat.completions.create(model="m", messages=MSGS, max_tokens=10)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.choices[0].message.content.startswith('{"a": "dolam_dol')
    srv.writing('{"a": "', repeat="dolam_")
    chunks = list(client(srv).chat.completions.create(model="m", messages=MSGS, max_tokens=7, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert srv.requests[-1].streamed_tokens == 7


def test_stream_paced_and_client_gone(srv: FakeOpenAI) -> None:
    srv.writing("x" * 400, delay=0.3, token_delay=0.05)
    started = time.monotonic()
    stream = client(srv).chat.completions.create(model="m", messages=MSGS, stream=True)
    first = next(iter(stream))
    assert time.monotonic() - started >= 0.25 and first.choices[0].delta.role == "assistant"
    for _ in range(3):
        next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 3
    while not srv.requests[-1].client_gone and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.requests[-1].client_gone and srv.requests[-1].streamed_tokens < 100


def test_empty_queue_is_500(srv: FakeOpenAI) -> None:
    with pytest.raises(openai.InternalServerError, match=NO_REPLY_MESSAGE):
        client(srv).chat.completions.create(model="m", messages=MSGS)


def test_responder_used_when_queue_empty(srv: FakeOpenAI) -> None:
    srv.reply("queued")
    srv.responder(lambda body: {"content": "echo:" + body["messages"][-1]["content"]})
    c = client(srv)
    first = c.chat.completions.create(model="m", messages=MSGS)
    second = c.chat.completions.create(model="m", messages=MSGS)
    assert first.choices[0].message.content == "queued"
    assert second.choices[0].message.content == "echo:hello there"
    srv.responder(lambda body: {"status": 503, "message": "down"})
    with pytest.raises(openai.InternalServerError, match="down"):
        c.chat.completions.create(model="m", messages=MSGS)
    srv.responder(lambda body: None)
    with pytest.raises(openai.InternalServerError, match=NO_REPLY_MESSAGE):
        c.chat.completions.create(model="m", messages=MSGS)


def test_delay_causes_client_timeout_and_server_survives(srv: FakeOpenAI) -> None:
    srv.reply("too late", delay=1.0).reply("on time")
    c = client(srv, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="m", messages=MSGS)
    assert time.monotonic() - start < 0.9
    r = c.chat.completions.create(model="m", messages=MSGS)
    assert r.choices[0].message.content == "on time"
    deadline = time.monotonic() + 5  # let the delayed handler write to the dead socket
    while srv.requests[0].response_status == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.requests[0].response_status == 200
    time.sleep(0.1)
    assert client(srv).models.list().data[0].id == "fake-model"


def test_stop_with_pending_delay_is_quick() -> None:
    srv = FakeOpenAI().start().allow_uncapped()
    srv.reply("x", delay=30)
    with pytest.raises(openai.APITimeoutError):
        client(srv, timeout=0.2).chat.completions.create(model="m", messages=MSGS)
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 2


@pytest.mark.asyncio
async def test_async_client(srv: FakeOpenAI) -> None:
    srv.reply("async hi")
    c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
    r = await c.chat.completions.create(model="m", messages=MSGS)
    assert r.choices[0].message.content == "async hi"
    assert srv.chat_requests()[0]["messages"] == MSGS
    await c.close()
