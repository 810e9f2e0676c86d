"""One `llm()` helper call: sent on the server's LLM client, recorded with a clipped copy of its prompt and reply.

`llm()` is how generated code reaches the LLM, and so a way out for whatever a step can read. Each HTTP call it
makes is recorded with the run like every LLM call (its tokens count against the budgets), together with the first
`AUDIT_CHARS` characters of the prompt, of the step's system text and of the reply, and the prompt's and system
text's full lengths (the reply's is the record's `response_chars`), so an operator can audit what left
(`autocode show RUN_ID`). Used by the run loop on `serve` and by remote workers alike. A call ends within
AUTOCODE_LLM_DEADLINE, and just before the tool host's AUTOCODE_TOOL_TIMEOUT would cut it, so the step reads how
long it waited and why it stopped.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from agent_core import prompts
from agent_core.llm import CallContext, LLMClient
from agent_core.llm_wait import Deadline

AUDIT_CHARS = 2000

Recorder = Callable[[dict[str, Any]], Awaitable[None]]


def clip(text: str, limit: int = AUDIT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def audit_fields(prompt: str, system: str, reply: str) -> dict[str, Any]:
    """The columns of a helper call's record that say what was sent and received (`system` as the step gave it:
    empty when the default helper system text was sent)."""
    return {"prompt_text": clip(prompt), "prompt_chars": len(prompt), "system_text": clip(system),
            "system_chars": len(system), "reply_text": clip(reply)}


async def ask_helper(llm: LLMClient, prompt: str, system: str, context: CallContext, record: Recorder) -> str:
    """Send one helper request on `llm`'s HTTP client; each call's record, with the audit fields, goes to `record`
    (also when the call fails or is cancelled)."""
    records: list[dict[str, Any]] = []
    client = LLMClient(llm.settings, client=llm.client, record=records.append)
    messages = [{"role": "system", "content": system or prompts.render("helper_system")},
                {"role": "user", "content": prompt}]
    reply = ""
    try:
        reply = await client.text(purpose="helper", messages=messages, context=context,
                                  deadline=Deadline.for_helper(llm.settings))
        return reply
    finally:
        for row in records:
            await record({**row, **audit_fields(prompt, system, reply)})


__all__ = ["AUDIT_CHARS", "ask_helper", "audit_fields", "clip"]
