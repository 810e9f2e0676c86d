"""The agent loop: plan -> execute -> evaluate -> repair, one fresh run at a time with all state in SQLite."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from agent_core import history, prompts, routines
from agent_core.answer_check import unsupported_numbers
from agent_core.approvals import Approvals
from agent_core.artifacts import select_artifacts
from agent_core.budget import BudgetExceeded, RunBudget
from agent_core.channel_settings import ChannelSettings, EffectiveSettings
from agent_core.checks import CheckError, check_subtask
from agent_core.config import Settings
from agent_core.disk import DISK_FULL, disk_full
from agent_core.events import (
    EvaluationDone, EventBus, PlanReady, RepairPlanned, RunEvent, RunFinished, RunStarted, StepFinished,
    StepStarted, WorkerWaiting, event_data, event_type,
)
from agent_core.helper import ask_helper
from agent_core.llm import CallContext, LLMClient, LLMError
from agent_core.manifest import InputsNotPlaced, PreparedInputs, known_inputs, place_inputs
from agent_core.plan import EVALUATION_SCHEMA, PLAN_CODE_SCHEMA, PLAN_SCHEMA, Evaluation, Plan
from agent_core.pricing import prices_for
from agent_core.sandbox import (
    Executor, Limits, PlannedStep, Sandbox, SandboxUnavailable, StepBatch, StepResult,
)
from agent_core.workspace import Workspace, result_record
from storage.db import Storage, now
from tools.host import ToolHost
from tools.journal import StorageJournal
from tools.registry import ToolSet, describe_functions, describe_guides

log = logging.getLogger(__name__)

# What the evaluator sees of each step: enough to judge and repair, small enough to stay cheap.
VIEW_CODE_CHARS = 1500
VIEW_OUTPUT_CHARS = 800
VIEW_ERROR_CHARS = 700
VIEW_LOG_CHARS = 300

# What the user reads when the model's plan or evaluation stayed unusable after the re-asks; the exact validation
# error goes to the log and onto the run's last LLM call of that purpose (run page, `autocode show`).
UNUSABLE_REPLY = {
    "plan": "The model could not make a usable plan for this task; try rephrasing it, "
            "or use a stronger model (AUTOCODE_MODEL).",
    "evaluate": "The model could not make a usable evaluation of the results; try rephrasing the task, "
                "or use a stronger model (AUTOCODE_MODEL).",
}


@dataclass(kw_only=True)
class StepRecord(StepResult):
    """One execution of one subtask (or its failed static check) within a run."""

    iteration: int
    index: int  # 0-based position in the plan
    tool_name: str
    code: str
    input_from: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "error"


@dataclass
class RunResult:
    run_id: str
    conversation: str
    status: str  # succeeded | failed | cancelled
    answer: str
    error: str | None
    iterations: int
    steps: list[StepRecord] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # name, mime, size; data in storage
    unsupported: list[str] = field(default_factory=list)  # numbers of the answer no step produced (a warning)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "conversation": self.conversation,
            "status": self.status,
            "answer": self.answer,
            "error": self.error,
            "iterations": self.iterations,
            "steps": [
                {"iteration": s.iteration, "tool_name": s.tool_name, "status": s.status, "output": s.output,
                 "error": s.error, "duration_ms": s.duration_ms}
                for s in self.steps
            ],
            "usage": self.usage,
            "artifacts": self.artifacts,
            "unsupported_numbers": self.unsupported,
        }


def _clip(text: str | None, limit: int, keep: str = "head") -> str:
    text = (text or "").strip()
    if len(text) <= limit:
        return text
    return text[:limit] + " …" if keep == "head" else "… " + text[-limit:]


def _traceback_frames(traceback: str | None) -> str:
    """The frames of a traceback without its header, final line (the error is shown on its own) and the ~~~^^^
    marker lines under a frame's code (they point at columns: noise for the evaluator, and tokens)."""
    lines = (traceback or "").strip().splitlines()
    if lines and lines[0].startswith("Traceback"):
        lines = lines[1:]
    frames = [line for line in lines if line.startswith(" ") and line.strip().strip("~^")]
    return "\n".join(frames)


def _history_text(messages: list[dict[str, Any]], limit_each: int | None = None) -> str:
    if not messages:
        return ""
    lines = ["Conversation so far:"]
    for message in messages:
        who = "User" if message["role"] == "user" else "AutoCode"
        text = message["text"] if limit_each is None else _clip(message["text"], limit_each)
        lines.append(f"{who}: {text}")
    return "\n".join(lines)


DISK_FULL_MESSAGE = (f"{DISK_FULL}, so this run stopped and could not be finished. The operator must free space; "
                     "then please send the task again.")


class Agent:
    """Runs tasks. Holds no per-run state: every `run()` starts from the database."""

    def __init__(
        self, settings: Settings, storage: Storage, llm: LLMClient, toolset: ToolSet, executor: Executor,
        events: EventBus | None = None,
    ):
        self.settings = settings
        self.storage = storage
        self.llm = llm
        self.toolset = toolset
        self.executor = executor
        self.events = events or EventBus()
        self.approvals = Approvals(storage, self.emit, settings.approval_timeout)  # calls of `confirm` tools
        self.channel_settings = ChannelSettings(storage, settings, toolset)  # per channel/chat: model, tools, …
        prices_for(settings)  # a broken price table is a ConfigError now, not at the first run
        self.step_slots = asyncio.Semaphore(settings.sandbox_slots)  # steps executing at once, all runs
        self.limits = Limits(
            timeout_s=settings.step_timeout, memory_mb=settings.step_memory_mb,
            max_output_kb=settings.step_max_output_kb, max_log_kb=settings.step_max_log_kb,
            file_size_mb=settings.workdir_mb, max_procs=settings.step_max_procs,
        )
        self._system_prompts: dict[tuple[str, ...], tuple[str, str]] = {}
        self._planner_system, self._evaluator_system = self.system_prompts(toolset)

    def system_prompts(self, toolset: ToolSet) -> tuple[str, str]:
        """The planner's and the evaluator's system prompts for a run with `toolset` (made once per set of tools:
        a channel may enable only some, agent_core/channel_settings.py)."""
        functions = describe_functions(toolset)  # with the MCP tools offered now (accepted, connected)
        key = (*toolset.libraries, "|", *toolset.trusted_names, "|", functions)
        if key not in self._system_prompts:
            libraries = ", ".join(toolset.libraries) or "none"
            planner = prompts.render(
                "planner_system", libraries=libraries, guides=describe_guides(toolset), functions=functions,
            )
            evaluator = prompts.render(
                "evaluator_system", libraries=libraries,
                functions=", ".join([*(f.split(" ->")[0] for t in toolset.tools for f in t.functions.values()),
                                     *(t.signature().split(" ->")[0] for t in toolset.mcp_tools())]) or "none",
            )
            self._system_prompts[key] = (planner, evaluator)
        return self._system_prompts[key]

    async def run(self, task: str, conversation: str = "console", *, user: str = "", adapter: str = "cli") -> RunResult:
        """Create and execute a run at once (the CLI's way; the server queues runs through the scheduler)."""
        run_id = self.storage.create_run(conversation, task.strip(), status="queued", user=user, adapter=adapter)
        return await self.execute(run_id)

    async def execute(self, run_id: str) -> RunResult:
        """Execute a queued run. Cancelling the calling task cancels the run and kills its running step."""
        row = self.storage.get_run(run_id)
        assert row is not None, run_id
        conversation, task = row["conversation"], row["task"]
        # The channel's settings as they are now apply to the whole run, and are stored with it (log, cost).
        effective = self.channel_settings.effective(conversation)
        self.storage.update_run(run_id, status="running", started_at=now(), scope=effective.scope,
                                settings_json=json.dumps(effective.to_json()))
        log.info("run %s: %s", run_id, effective.describe())
        history = self.storage.recent_messages(conversation, self.settings.history_chars)
        self.storage.add_message(conversation, "user", task, run_id)
        pinned = routines.pinned_plan(self.storage, row)  # a routine's run re-runs its verified plan
        return await _Run(self, run_id, conversation, task, history, effective, pinned).execute()

    async def close(self) -> None:
        """Stop what the agent started: its sandbox pool, its MCP servers, its LLM client, its database."""
        await self.executor.stop()
        if self.toolset.mcp_host is not None:
            await self.toolset.mcp_host.close()  # the MCP servers stop with the process
        await self.llm.close()
        self.storage.close()

    async def emit(self, event: RunEvent) -> None:
        self.storage.add_event(event.run_id, event_type(event), event_data(event))
        await self.events.emit(event)


class _StepProgress:
    """Turns a batch's progress into step events and stored steps of the current iteration."""

    def __init__(self, run: "_Run", plan: Plan):
        self.run = run
        self.plan = plan
        self.names = [s.tool_name for s in plan.subtasks]
        self.records: list[StepRecord] = []
        self.first_index: int | None = None

    async def started(self, step: PlannedStep) -> None:
        self.run.budget.new_step()  # llm() calls are capped per step
        index = self.names.index(step.name)
        if self.first_index is None:
            self.first_index = index
        await self.run.agent.emit(StepStarted(self.run.run_id, self.run.iteration, index + 1, len(self.names),
                                              step.name, self.plan.subtasks[index].description))

    async def finished(self, step: PlannedStep, result: StepResult) -> None:
        record = StepRecord(**vars(result), code=step.code, input_from=step.input_from,
                            iteration=self.run.iteration, index=self.names.index(step.name), tool_name=step.name)
        await self.record(record)

    async def record(self, record: StepRecord) -> None:
        run = self.run
        run._store_step(record, self.plan.subtasks[record.index].description)
        self.records.append(record)
        await run.agent.emit(StepFinished(
            run.run_id, run.iteration, record.index + 1, len(self.names), record.tool_name, record.ok,
            record.duration_ms, record.error,
            _clip(json.dumps(record.output, ensure_ascii=False), 200) if record.ok else "",
        ))

    async def waiting(self, ahead: int, waited_s: float) -> None:
        """The batch waits in the job queue for a worker (agent_core/sandbox/remote.py)."""
        await self.run.agent.emit(WorkerWaiting(self.run.run_id, ahead, round(waited_s, 1)))

    async def restarted(self) -> None:
        if self.first_index is not None:
            self.run._forget_steps(self.run.iteration, self.first_index)
        self.records = []


class _Run:
    """The state of one run while it executes."""

    def __init__(self, agent: Agent, run_id: str, conversation: str, task: str, history: list[dict[str, Any]],
                 effective: EffectiveSettings, pinned: Plan | None = None):
        self.agent = agent
        self.pinned = pinned  # a routine's pinned plan (agent_core/routines.py): run without asking the planner
        self.effective = effective  # the channel's settings: model, iterations, tools
        self.model = effective.model
        self.max_iterations = effective.max_iterations
        self.toolset = agent.channel_settings.toolset_for(effective)
        self.planner_system, self.evaluator_system = agent.system_prompts(self.toolset)
        self.settings = agent.settings
        self.storage = agent.storage
        self.run_id = run_id
        self.conversation = conversation
        self.task = task
        self.history = history
        self.iteration = 0
        self.records: list[StepRecord] = []
        self.artifacts: list[dict[str, Any]] = []
        self.files_note: str | None = None  # what of outputs/ was bundled or left out
        self.failure: str | None = None  # why it ended without an answer (agent_core/history.py's kinds)
        self.unsupported: list[str] = []  # numbers of the answer found in no step output nor the task
        self.workspace = Workspace(self.storage, self.settings)  # the conversation's files (issue 13)
        self.inputs = PreparedInputs()  # the workspace as this run's inputs/, and its manifest
        self.sandbox: Sandbox | None = None  # opened when the first code needs it (a direct answer needs none)
        self.kept_files: list[Any] = []  # the artifacts kept: they join the workspace after the run
        self.budget = RunBudget.for_run(self.settings, self.storage, run_id)
        self.tool_host = ToolHost(self.toolset, self._llm_helper, self.settings.tool_timeout, self.budget,
                                  approve=lambda tool, args, kwargs: agent.approvals.ask(run_id, tool, args, kwargs),
                                  journal=StorageJournal(self.storage, run_id), record_mcp=self._store_mcp_call)

    def _context(self) -> CallContext:
        # emit: its waits are shown; the model is the run's, for the planner, the evaluator and llm() alike
        return CallContext(self.run_id, self.iteration or None, self.agent.emit, self.model)

    def _check_budget(self) -> None:
        """Before the run's next LLM call of its own: stop it (BudgetExceeded) when its run or daily budget is spent."""
        self.budget.check_run_call()

    async def _llm_helper(self, prompt: str, system: str) -> str:
        """An `llm()` call the tool host admitted: sent, and stored with its clipped prompt and reply."""
        return await ask_helper(self.agent.llm, prompt, system, self._context(), self._store_llm_call)

    async def _store_llm_call(self, record: dict[str, Any]) -> None:
        self.storage.add_llm_call(record)

    async def _store_mcp_call(self, record: dict[str, Any]) -> None:
        self.storage.add_mcp_call({**record, "run_id": self.run_id, "iteration": self.iteration, "started_at": now()})

    async def _start_mcp(self) -> None:
        """Connect the MCP servers (once per process; kept), so the planner sees the tools they offer now."""
        if self.toolset.mcp_host is not None and self.toolset.mcp_servers:
            await self.toolset.mcp_host.start()
            self.planner_system, self.evaluator_system = self.agent.system_prompts(self.toolset)

    async def execute(self) -> RunResult:
        await self.agent.emit(RunStarted(self.run_id, self.conversation, self.task))
        status, answer, error = "failed", "", None
        try:
            await self._start_mcp()
            status, answer, error = await self._loop()
        except BudgetExceeded as exc:
            error, self.failure = str(exc), "budget"
        except LLMError as exc:
            error = str(exc)
            self.failure = self.failure or "unreachable"
        except InputsNotPlaced as exc:  # the user's files did not fit (issue 13): their message, not the operator's
            error, self.failure = str(exc), "files"
        except SandboxUnavailable as exc:
            log.error("run %s: no sandbox: %s", self.run_id, exc)
            error, self.failure = "The sandbox could not start, so no code ran; the operator can run `autocode doctor`.", "sandbox"
        except asyncio.CancelledError:
            status, error, self.failure = "cancelled", "The run was cancelled.", "cancelled"
            raise
        except Exception as exc:  # a bug of ours: the user gets a short message, the operator the traceback
            if disk_full(exc):  # not a bug: the user is told the cause (the end may not be writable either)
                log.error("run %s: the disk is full (%s)", self.run_id, exc)
                error = DISK_FULL_MESSAGE
            else:
                log.exception("run %s crashed", self.run_id)
                error = f"Internal error ({type(exc).__name__}); see the server log for run {self.run_id}."
        finally:
            if self.sandbox is not None:
                await asyncio.shield(self._close_sandbox(self.sandbox, keep_outputs=status != "cancelled"))
            answer, error = await self._finish(status, answer, error)
        return self._result(status, answer, error)

    async def _close_sandbox(self, sandbox: Sandbox, keep_outputs: bool) -> None:
        """Store the files the steps left under outputs/ as the run's artifacts, then destroy the sandbox."""
        try:
            if keep_outputs and self.records:
                mib = 1024 * 1024
                collected = await sandbox.collect_outputs(
                    self.settings.artifact_max_mb * mib, self.settings.artifacts_max_mb * mib)
                kept, self.files_note = select_artifacts(collected, self.settings.artifacts_max_count)
                self.kept_files = kept
                for artifact in kept:
                    self.storage.add_artifact(self.run_id, artifact.name, artifact.mime, artifact.data)
                    self.artifacts.append({"name": artifact.name, "mime": artifact.mime, "size": len(artifact.data)})
                if collected.left_out:
                    log.warning("run %s: %s output files not kept, e.g. %s", self.run_id, collected.left_out,
                                "; ".join(collected.skipped[:5]))
        finally:
            await sandbox.close()

    async def _open_sandbox(self) -> Sandbox:
        """The run's sandbox with the conversation's files under inputs/ (previewed there if no run did before)."""
        if self.sandbox is None:
            self.sandbox = await self.agent.executor.open(self.run_id)
            await place_inputs(self.sandbox, self.workspace, self.inputs, self.agent.limits, self.agent.step_slots)
        return self.sandbox

    async def _loop(self) -> tuple[str, str, str | None]:
        # The planner is asked before a sandbox is opened when the files' manifest is known from earlier runs (or
        # there are no files): a direct answer then costs one LLM call and no sandbox. A new file is previewed in
        # the sandbox first, since the planner must see it.
        self.inputs = known_inputs(self.workspace, self.conversation, self.run_id)
        if not self.inputs.ready:
            await self._open_sandbox()
        plan = await self._plan()
        if plan.direct:
            self.storage.update_run(self.run_id, plan=plan.model_dump())
            self._check_answer(plan.direct_answer.strip())  # a server that ignored the subtasks-only schema
            return "succeeded", plan.direct_answer.strip(), None
        sandbox = await self._open_sandbox()
        outputs: dict[str, dict[str, Any]] = {}
        start = 0
        previous_failure: tuple[str, str] | None = None
        for self.iteration in range(1, self.max_iterations + 1):
            self.storage.update_run(self.run_id, plan=plan.model_dump(), iterations=self.iteration)
            current = await self._execute_steps(plan, start, outputs, sandbox)
            self._check_budget()  # llm() calls from the steps count too
            failure = next((r for r in current if not r.ok), None)
            if failure is not None:
                signature = (failure.tool_name, failure.error or "")
                if signature == previous_failure:
                    return "failed", "", (
                        f"Stopped: step {failure.tool_name} failed twice in a row with the same error: {failure.error}"
                    )
                previous_failure = signature
            else:
                previous_failure = None

            unfinished = self._unfinished(plan, start, current)
            evaluation = await self._evaluate(plan, start, current, unfinished)
            if evaluation.satisfactory and unfinished is not None:
                # A verdict of "satisfactory" over a failed or never-run step is no success: the evaluator is asked
                # once more, told so; if it insists, the run fails with the step's error.
                evaluation = await self._evaluate(plan, start, current, unfinished, correction=True)
                if evaluation.satisfactory:
                    self.failure = "steps"
                    return "failed", "", f"The task could not be completed: {self._unfinished_sentence(unfinished)}"
            if evaluation.satisfactory:
                answer = evaluation.final_answer.strip()
                self._check_answer(answer)
                return "succeeded", answer, None
            self.failure = "steps"
            if not evaluation.new_subtasks:
                return "failed", evaluation.final_answer.strip(), f"The task could not be completed: {evaluation.thoughts}"
            if self.iteration == self.max_iterations:
                break
            self._check_budget()  # a repair needs the evaluator again: stop now if the budget is spent
            retry_from = evaluation.retry_from.strip()
            start = plan.index_of(retry_from)  # validated by Evaluation.check_against
            plan = plan.repaired(retry_from, evaluation.new_subtasks)
            kept = [s.tool_name for s in plan.subtasks[:start]]
            outputs = {name: outputs[name] for name in kept}
            await self.agent.emit(RepairPlanned(
                self.run_id, self.iteration + 1, retry_from, [s.tool_name for s in plan.subtasks],
                [s.tool_name for s in plan.subtasks[:start]],
            ))
        why = self._unfinished_sentence(unfinished) if unfinished is not None else evaluation.thoughts
        return "failed", evaluation.final_answer.strip(), (
            f"No satisfactory result after {self.max_iterations} iterations: {why}"
        )

    @staticmethod
    def _unfinished(plan: Plan, start: int, current: list[StepRecord]) -> tuple[str, str | None] | None:
        """The first subtask of this iteration that failed (its name and error) or never ran (its name, None)."""
        ran = {r.tool_name: r for r in current}
        for subtask in plan.subtasks[start:]:
            record = ran.get(subtask.tool_name)
            if record is None:
                return subtask.tool_name, None
            if not record.ok:
                return subtask.tool_name, record.error or "failed"
        return None

    @staticmethod
    def _unfinished_sentence(unfinished: tuple[str, str | None]) -> str:
        name, error = unfinished
        return f"step {name} did not run." if error is None else f"step {name} failed: {_clip(error, VIEW_ERROR_CHARS)}"

    def _check_answer(self, answer: str) -> None:
        """Flag numbers of the answer that no step output, log nor the task holds: a warning on the run's log and
        page, not a failure (the evaluator may have computed or rounded one legitimately)."""
        sources = [*self._known_texts(), *(json.dumps(r.output, ensure_ascii=False) for r in self.records if r.ok),
                   *(r.stdout for r in self.records if r.ok)]
        self.unsupported = unsupported_numbers(answer, sources)
        if self.unsupported:
            log.warning("run %s: numbers of the answer not found in any step's output: %s", self.run_id,
                        ", ".join(self.unsupported))
            self.storage.update_run(self.run_id, unsupported_json=json.dumps(self.unsupported))

    def _instructions(self) -> str:
        """The channel's own instructions as a delimited block of the planner's and evaluator's user message."""
        text = self.effective.instructions
        return prompts.render("team_instructions", text=text.replace(">>>", "> > >")) if text else ""

    async def _plan(self) -> Plan:
        self._check_budget()  # the user's day may have been spent while the run was queued
        plan = self.pinned if self.pinned is not None else await self._plan_afresh()
        if plan.direct:
            return plan  # no steps to announce: the answer comes with RunFinished
        await self.agent.emit(PlanReady(
            self.run_id, 1, plan.main_task_thought, [s.tool_name for s in plan.subtasks],
            [s.description for s in plan.subtasks],
        ))
        return plan

    async def _plan_afresh(self) -> Plan:
        """The planner's plan for the task (a routine's run brings its pinned plan instead)."""
        messages = [
            {"role": "system", "content": self.planner_system},
            {"role": "user", "content": prompts.render(
                "planner_user", instructions=self._instructions(), history=_history_text(self.history),
                files=self.inputs.manifest, task=self.task)},
        ]
        plan = await self._ask_planner(messages, PLAN_SCHEMA)
        if plan.direct:
            # A direct answer may not state numbers that nothing computed: a small model answers "17 * 23" with
            # "420" without code (issue 20). It is asked once more, for subtasks only.
            made_up = unsupported_numbers(plan.direct_answer, self._known_texts())
            if made_up:
                log.info("run %s: a direct answer with numbers nothing computed (%s): asking for code", self.run_id,
                         ", ".join(made_up))
                messages += [{"role": "assistant", "content": _clip(plan.direct_answer, 500)},
                             {"role": "user", "content": prompts.render("direct_numbers", numbers=", ".join(made_up))}]
                plan = await self._ask_planner(messages, PLAN_CODE_SCHEMA)
        self._check_budget()
        return plan

    async def _ask_planner(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> Plan:
        try:
            return await self.agent.llm.structured(
                purpose="plan", messages=messages, schema_name="plan", schema=schema,
                shape_hint=prompts.render("plan_shape"), model=Plan, context=self._context(),
            )
        except LLMError as exc:
            self.failure = "unreachable" if exc.unreachable else "plan"
            raise self._plain_if_unusable(exc, "plan") from None

    def _known_texts(self) -> list[str]:
        """What an answer may quote without computing it: the task, the conversation, the files' manifest."""
        return [self.task, *(m["text"] for m in self.history), self.inputs.manifest or ""]

    async def _execute_steps(
        self, plan: Plan, start: int, outputs: dict[str, dict[str, Any]], sandbox: Sandbox,
    ) -> list[StepRecord]:
        """Run subtasks from `start` until one fails; earlier outputs are reused, not re-run.

        Every subtask is checked first; the ones before the first failed check run as one batch (on a remote
        worker, one job), and a failed check is recorded as that step's failure."""
        names = [s.tool_name for s in plan.subtasks]
        batch: list[PlannedStep] = []
        check_failure: StepRecord | None = None
        for index in range(start, len(plan.subtasks)):
            subtask = plan.subtasks[index]
            try:
                checked = check_subtask(subtask, names[:index], self.toolset)
            except CheckError as exc:
                check_failure = StepRecord(ok=False, error=f"Check failed: {exc}", code=subtask.code,
                                           iteration=self.iteration, index=index, tool_name=subtask.tool_name)
                break
            batch.append(PlannedStep(subtask.tool_name, checked.code, checked.input_from, checked.libraries))
        progress = _StepProgress(self, plan)
        if batch:
            needed = {step.input_from for step in batch} - {step.name for step in batch} - {None}
            await sandbox.run_batch(
                StepBatch(batch, {name: outputs[name] for name in needed}, self.agent.limits, self.tool_host.names,
                          self.iteration, approve=self.tool_host.approve),
                self.tool_host.call, progress, gate=self.agent.step_slots,
            )
        batch_completed = len(progress.records) == len(batch) and all(r.ok for r in progress.records)
        if check_failure is not None and batch_completed:
            await self.agent.emit(StepStarted(self.run_id, self.iteration, check_failure.index + 1, len(names),
                                              check_failure.tool_name, plan.subtasks[check_failure.index].description))
            await progress.record(check_failure)
        for record in progress.records:
            if record.ok:
                outputs[record.tool_name] = record.output or {}
        return progress.records

    def _store_step(self, record: StepRecord, description: str) -> None:
        self.records.append(record)
        self.storage.add_step({
            "run_id": self.run_id, "iteration": record.iteration, "position": record.index,
            "tool_name": record.tool_name, "input_from_tool": record.input_from or "", "description": description,
            "code": record.code, "status": record.status,
            "output_json": None if record.output is None else json.dumps(record.output, ensure_ascii=False),
            "stdout": record.stdout, "stderr": record.stderr, "error": record.error, "traceback": record.traceback,
            "duration_ms": record.duration_ms, "worker": record.worker,
        })

    def _forget_steps(self, iteration: int, from_index: int) -> None:
        self.records = [r for r in self.records if not (r.iteration == iteration and r.index >= from_index)]
        self.storage.delete_steps(self.run_id, iteration, from_index)

    def _steps_view(self, plan: Plan, start: int, current: list[StepRecord]) -> str:
        kept = {r.tool_name: r for r in self.records if r.ok and r.index < start}
        ran = {r.tool_name: r for r in current}
        blocks = []
        for index, subtask in enumerate(plan.subtasks):
            record = (kept if index < start else ran).get(subtask.tool_name)
            head = f"[{index + 1}] {subtask.tool_name}"
            if index:
                head += f"(previous_output from {subtask.input_from_tool or plan.subtasks[index - 1].tool_name})"
            if record is None:
                status = "not run"
            elif record.iteration < self.iteration:
                status = f"ok, kept from iteration {record.iteration}"
            else:
                status = f"{record.status} in {record.duration_ms} ms"
            lines = [f"{head}: {status}. {subtask.description}".rstrip(". ") + "."]
            if index >= start:  # kept steps were judged before; their code would only cost tokens
                lines += ["```", _clip(subtask.code, VIEW_CODE_CHARS), "```"]
            if record is not None:
                if record.ok:
                    lines.append("output: " + _clip(json.dumps(record.output, ensure_ascii=False), VIEW_OUTPUT_CHARS))
                else:
                    lines.append("error: " + _clip(record.error, VIEW_ERROR_CHARS))
                    frames = _traceback_frames(record.traceback)
                    if frames:
                        lines.append("traceback:\n" + _clip(frames, VIEW_ERROR_CHARS, keep="tail"))
                for name, text in (("stdout", record.stdout), ("stderr", record.stderr)):
                    if text.strip():
                        lines.append(f"{name}: " + _clip(text, VIEW_LOG_CHARS, keep="tail"))
            blocks.append("\n".join(lines))
        return "\n".join(blocks)

    async def _evaluate(self, plan: Plan, start: int, current: list[StepRecord],
                        unfinished: tuple[str, str | None] | None = None, correction: bool = False) -> Evaluation:
        """The evaluator's verdict on this iteration. A "satisfactory" over a failed or never-run step (`unfinished`)
        is stored and shown as overruled; with `correction` the evaluator is told so first."""
        messages = [
            {"role": "system", "content": self.evaluator_system},
            {"role": "user", "content": prompts.render(
                "evaluator_user", instructions=self._instructions(),
                history=_history_text(self.history[-2:], 400), files=self.inputs.manifest,
                task=self.task,
                iteration=f"{self.iteration} of {self.max_iterations}", steps=self._steps_view(plan, start, current),
            )},
        ]
        if correction and unfinished is not None:
            messages.append({"role": "user", "content": prompts.render(
                "evaluator_correction", step=unfinished[0],
                what="did not run" if unfinished[1] is None else "failed")})
        try:
            evaluation = await self.agent.llm.structured(
                purpose="evaluate", messages=messages, schema_name="evaluation", schema=EVALUATION_SCHEMA,
                shape_hint=prompts.render("evaluation_shape"), model=Evaluation,
                validate=lambda e: e.check_against(plan), context=self._context(),
            )
        except LLMError as exc:
            self.failure = "unreachable" if exc.unreachable else "evaluate"
            raise self._plain_if_unusable(exc, "evaluate") from None
        satisfactory, thoughts = evaluation.satisfactory, evaluation.thoughts
        if satisfactory and unfinished is not None:
            satisfactory = False
            thoughts = (f"Not satisfactory: {self._unfinished_sentence(unfinished)} "
                        f"(The evaluator had called it satisfactory: {_clip(thoughts, 300)})")
        self.storage.add_evaluation({
            "run_id": self.run_id, "iteration": self.iteration, "satisfactory": int(satisfactory),
            "thoughts": thoughts, "final_answer": evaluation.final_answer,
            "retry_from": evaluation.retry_from, "evaluation_json": evaluation.model_dump_json(),
        })
        await self.agent.emit(EvaluationDone(self.run_id, self.iteration, satisfactory, thoughts))
        return evaluation

    def _plain_if_unusable(self, exc: LLMError, purpose: str) -> LLMError:
        """A reply still unusable after the re-asks becomes UNUSABLE_REPLY's sentence; its exact validation error is
        logged and stored on the run's last `purpose` call. Other LLM errors (unreachable, 401...) are plain already."""
        detail = str(exc)
        if "reply was unusable" not in detail:  # LLMClient.structured's wording for a reply that never parsed
            return exc
        log.warning("run %s: %s", self.run_id, detail)
        answered = [c for c in self.storage.llm_calls(self.run_id) if c["purpose"] == purpose and not c["error"]]
        if answered:
            self.storage.note_llm_call_error(answered[-1]["id"], detail)
        return LLMError(UNUSABLE_REPLY[purpose])

    async def _finish(self, status: str, answer: str, error: str | None) -> tuple[str, str | None]:
        """Store and announce the run's end; returns the answer and error as stored (with the notes on its files
        and its routine)."""
        self._keep_workspace(status, answer, error)
        if answer and self.files_note:  # the answer says which files it could not attach
            answer = f"{answer}\n\n{self.files_note}"
        # A routine's run: its plan pinned or its failure counted; the post says so (and what was skipped)
        answer, error = routines.after_run(self.storage, self.run_id, status, answer, error)
        self.storage.finish_run(self.run_id, status, answer, error, self.iteration)
        # The history gets the answer, or a neutral note: never error text (agent_core/history.py).
        reply = answer if status == "succeeded" else history.note(self.failure or status)
        if reply:
            self.storage.add_message(self.conversation, "assistant", reply, self.run_id)
        usage = self.storage.usage(self.run_id)
        await self.agent.emit(RunFinished(self.run_id, status, answer, error, self.iteration, usage))
        return answer, error

    def _keep_workspace(self, status: str, answer: str, error: str | None) -> None:
        """The run's kept outputs and its result join the conversation's workspace (not for a cancelled run);
        what the user should know about it (files removed by age, or over the quota) joins the files note."""
        notes = list(self.inputs.notes)
        if status != "cancelled" and self.sandbox is not None:  # a direct answer made no data to keep
            try:
                record = result_record(self.storage.run_number(self.run_id), self.run_id, self.task, status, answer,
                                       error, [a.name for a in self.kept_files])
                note = self.workspace.keep_run(self.conversation, self.run_id, self.kept_files, record)
                if note:
                    notes.append(note)
            except OSError as exc:  # the disk is full or the blob directory unwritable: the run's answer stands
                log.error("run %s: could not keep its files in the workspace: %s", self.run_id, exc)
                notes.append("This run's files could not be kept for follow-ups (a storage error on the server).")
        if notes:
            self.files_note = "\n".join([*([self.files_note] if self.files_note else []), *notes])

    def _result(self, status: str, answer: str, error: str | None) -> RunResult:
        return RunResult(
            self.run_id, self.conversation, status, answer, error, self.iteration, list(self.records),
            self.storage.usage(self.run_id), list(self.artifacts), list(self.unsupported),
        )


__all__ = ["Agent", "RunResult", "StepRecord"]
