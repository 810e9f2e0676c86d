"""The fake Slack Web API's own checks, driven by the real `slack_sdk` AsyncWebClient over HTTP: every call's
arguments are checked against the client method's signature (an argument slack_sdk does not have is answered
`invalid_arguments`, kept in `rejected`, and fails the `with` block), and the assistant and view methods answer as
Slack does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from tests.fakes.slack_server import FakeSlack, signature_problem, view_text


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def call(fake: FakeSlack, method: str, **kwargs: Any) -> Any:
    client = AsyncWebClient(token="xoxb-t", base_url=fake.api_url)
    return await getattr(client, method)(**kwargs)


async def raw(fake: FakeSlack, method: str, params: dict[str, Any]) -> Any:
    """A call slack_sdk's typed method would not make: api_call with params of our choosing."""
    client = AsyncWebClient(token="xoxb-t", base_url=fake.api_url)
    return await client.api_call(method, json=params)


def test_signature_problem_names_unknown_and_missing_arguments():
    assert signature_problem("chat.postMessage", {"channel": "C1", "text": "hi"}) is None
    assert "colour" in signature_problem("chat.postMessage", {"channel": "C1", "colour": "red"})
    assert "channel" in signature_problem("chat.postMessage", {"text": "hi"})
    assert "no such method" in signature_problem("chat.postMesage", {"channel": "C1"})
    assert signature_problem("assistant.threads.setStatus", {"channel_id": "D1", "thread_ts": "1.2", "status": ""}) \
        is None
    assert signature_problem("auth.test", {}) is None


def test_calls_slack_sdk_makes_pass_and_are_answered():
    with FakeSlack() as fake:
        run(call(fake, "assistant_threads_setStatus", channel_id="D1", thread_ts="1.2", status="planning…"))
        run(call(fake, "assistant_threads_setStatus", channel_id="D1", thread_ts="1.2", status=""))
        run(call(fake, "assistant_threads_setTitle", channel_id="D1", thread_ts="1.2", title="Closest offices"))
        run(call(fake, "assistant_threads_setSuggestedPrompts", channel_id="D1", thread_ts="1.2",
                 prompts=[{"title": "Chart", "message": "Make a chart"}]))
        home = {"type": "home", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*runs*"}}]}
        answer = run(call(fake, "views_publish", user_id="UALICE", view=home))
        assert answer["view"]["id"].startswith("V")
        modal = {"type": "modal", "title": {"type": "plain_text", "text": "Settings"}, "blocks": []}
        assert run(call(fake, "views_open", trigger_id="t.1", view=modal))["ok"]
        assert fake.statuses("D1", "1.2") == ["planning…", ""]
        assert view_text(fake.published("UALICE")) == "*runs*"
        assert fake.published("UBOB") is None
        assert fake.rejected == []


def test_an_argument_slack_sdk_lacks_is_answered_an_error_and_fails_the_test():
    fake = FakeSlack().start()
    with pytest.raises(SlackApiError) as refused:
        run(raw(fake, "assistant.threads.setStatus", {"channel_id": "D1", "thread_ts": "1.2", "status": "x",
                                                       "emoji": ":x:"}))
    assert refused.value.response["error"] == "invalid_arguments"
    with pytest.raises(SlackApiError) as unknown:
        run(raw(fake, "assistant.threads.setStatuses", {"channel_id": "D1"}))
    assert unknown.value.response["error"] == "unknown_method"
    assert [c.method for c in fake.rejected] == ["assistant.threads.setStatus", "assistant.threads.setStatuses"]
    with pytest.raises(AssertionError, match="emoji"):
        fake.stop()


def test_views_and_prompts_are_checked_as_slack_checks_them():
    with FakeSlack() as fake:
        too_many = [{"type": "divider"}] * 101
        for method, kwargs in [
            ("views_publish", {"user_id": "U1", "view": {"type": "home", "blocks": too_many}}),
            ("views_publish", {"user_id": "U1", "view": {"type": "modal", "blocks": []}}),
            ("views_open", {"trigger_id": "t", "view": {"type": "modal", "title": {"type": "plain_text",
                                                                                    "text": "x" * 25}, "blocks": []}}),
            ("views_open", {"view": {"type": "modal", "title": {"type": "plain_text", "text": "ok"}, "blocks": []}}),
            ("assistant_threads_setSuggestedPrompts", {"channel_id": "D1", "prompts": [{"title": "t"}]}),
            ("assistant_threads_setSuggestedPrompts",
             {"channel_id": "D1", "prompts": [{"title": "t", "message": "m"}] * 5}),
        ]:
            with pytest.raises(SlackApiError):
                run(call(fake, method, **kwargs))
        assert fake.rejected == []  # refused for their content, not for their arguments
