"""All configuration, read from the environment (and a `.env` file) in one place."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

DEFAULT_MODEL = "gpt-4o-mini"
# What a new Slack assistant thread suggests (title, the message it sends); AUTOCODE_SLACK_SUGGESTED_PROMPTS.
DEFAULT_SUGGESTED_PROMPTS: tuple[tuple[str, str], ...] = (
    ("Analyse a file", "I will attach a CSV or Excel file: tell me its columns, totals and anything unusual."),
    ("Make a chart", "Make a bar chart of the populations of Germany, France, Italy, Spain and Poland."),
    ("Compute something", "Which two of these offices are closest to each other? Paris 48.8566,2.3522; "
                          "London 51.5072,-0.1276; Berlin 52.52,13.405; Madrid 40.4168,-3.7038"),
)
SUGGESTED_PROMPTS_MAX = 4  # Slack shows at most four

LLM_SETUP_HELP = """\
No LLM is configured. AutoCode talks to any OpenAI-compatible endpoint:
  OpenAI:     export OPENAI_API_KEY=sk-...            (optional: AUTOCODE_MODEL=gpt-4o-mini)
  Ollama:     export OPENAI_BASE_URL=http://localhost:11434/v1 AUTOCODE_MODEL=qwen2.5-coder:7b
  llama.cpp:  export OPENAI_BASE_URL=http://localhost:8080/v1
  vLLM:       export OPENAI_BASE_URL=http://localhost:8000/v1 AUTOCODE_MODEL=<served model name>
The same variables can be put in a .env file in the working directory."""


class ConfigError(Exception):
    """A configuration problem the operator must fix (the CLI exits with code 2)."""


def load_dotenv_file(path: Path | None = None) -> None:
    """Load `.env` from the working directory without overriding variables already set."""
    from dotenv import load_dotenv

    load_dotenv(path or Path.cwd() / ".env", override=False)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _money(env: Mapping[str, str], name: str) -> float:
    """An amount in USD ("5", "5.00", "$5"); empty or 0 means none."""
    raw = env.get(name, "").strip().removeprefix("$").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an amount in USD, e.g. 5 or 12.50, got {raw!r}") from None
    if value < 0 or not math.isfinite(value):
        raise ConfigError(f"{name} must be a positive amount in USD, got {raw!r}")
    return value


def _names(env: Mapping[str, str], name: str) -> frozenset[str]:
    """A comma list (an allowlist); empty means everyone."""
    return frozenset(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _prompts(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    """Suggested prompts: a JSON list of {"title": …, "message": …} (or strings, title and message alike), at
    most four; "off" or [] for none; empty for the defaults."""
    import json

    raw = env.get(name, "").strip()
    if not raw:
        return DEFAULT_SUGGESTED_PROMPTS
    if raw.lower() == "off":
        return ()
    try:
        items = json.loads(raw)
    except ValueError:
        items = None
    prompts: list[tuple[str, str]] = []
    for item in items if isinstance(items, list) else [None]:
        if isinstance(item, str):
            item = {"title": item, "message": item}
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                  for k in ("title", "message")):
            raise ConfigError(f'{name} must be a JSON list of {{"title": "…", "message": "…"}} (or of strings), '
                              f"or off, got {raw[:80]!r}")
        prompts.append((item["title"].strip(), item["message"].strip()))
    if len(prompts) > SUGGESTED_PROMPTS_MAX:
        raise ConfigError(f"{name} lists {len(prompts)} prompts; Slack shows at most {SUGGESTED_PROMPTS_MAX}")
    return tuple(prompts)


def _zone(env: Mapping[str, str], name: str) -> str:
    """An IANA time zone name (default UTC), checked against the system's zone database."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    raw = env.get(name, "").strip() or "UTC"
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name} must be an IANA time zone such as Europe/Rome, got {raw!r}") from None
    return raw


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    """Every knob AutoCode reads; build it with `Settings.from_env()`."""

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    model: str = DEFAULT_MODEL
    llm_timeout: float = 120.0  # one attempt of one request
    llm_max_retries: int = 3
    llm_startup_check: bool = True  # serve checks the LLM endpoint in the background at start and logs it
    llm_deadline: float = 180.0  # one LLM call in all: its retries, format fallbacks and re-asks
    llm_stream: bool = True  # stream replies: "no answer" and "still writing" told apart (agent_core/llm_stream.py)
    # Reply caps (max_tokens) by purpose: a small model left uncapped repeats itself until the deadline.
    llm_max_tokens_plan: int = 1500
    llm_max_tokens_evaluate: int = 1200
    llm_max_tokens_helper: int = 1000
    db_path: Path = Path("autocode.db")
    tools_file: Path | None = None
    max_iterations: int = 3
    history_chars: int = 4000
    step_timeout: float = 60.0
    step_memory_mb: int = 1024
    step_max_output_kb: int = 256
    step_max_log_kb: int = 64
    workdir_mb: int = 256
    workdir_root: Path | None = None
    tool_timeout: float = 60.0
    approval_timeout: float = 600.0  # seconds a `confirm` tool call waits for Approve/Deny; then it is denied
    step_max_procs: int = 64
    sandbox_backend: str = "auto"  # auto | bwrap | process
    sandbox_network: bool = False
    sandbox_warm: int = 2
    sandbox_uid_base: int = 61000
    sandbox_max_workers: int = 64
    artifact_max_mb: int = 10
    artifacts_max_mb: int = 25
    artifacts_max_count: int = 10  # files kept one by one; the rest of outputs/ goes into one more-outputs.zip
    input_max_mb: int = 50  # a file given to a run (inputs/), at most
    input_max_files: int = 10  # files given to one run, at most
    workspace_mb: int = 200  # a conversation's kept files (agent_core/workspace.py), at most
    workspace_days: int = 30  # a kept file is removed after this many days
    workspaces_max_mb: int = 0  # all conversations' kept files together, at most (uploads refused over it); 0: no cap
    disk_reserve_mb: int = 64  # free space uploads must leave on the data directory's (and temp) filesystem
    body_timeout: float = 30.0  # seconds to receive a request body (plus its size at 64 KB/s), and between chunks
    max_concurrent_runs: int = 32
    sandbox_slots: int = field(default_factory=lambda: os.cpu_count() or 2)
    max_tokens_per_run: int = 200_000  # 0: no limit
    daily_tokens_per_user: int = 0  # 0: no limit
    # Models users may choose per channel (agent_core/channel_settings.py); `model` is always among them.
    models: tuple[str, ...] = ()
    monthly_budget_per_user: float = 0.0  # USD per calendar month (UTC) of one user's runs; 0: no budget
    prices_file: Path | None = None  # price table (agent_core/pricing.py); None: agent_core/prices.toml
    llm_calls_per_step: int = 20  # llm() helper calls one step may make
    mcp_calls_per_step: int = 50  # calls of MCP servers' tools one step may make (tools/mcp_host.py)
    mcp_result_kb: int = 256  # an MCP tool's result handed to a step is clipped to this many KB of text
    llm_prompt_max_chars: int = 20_000  # largest llm() prompt (with its system text)
    shutdown_grace: float = 30.0
    # Routines (agent_core/routines.py): the shortest gap between two firings, how late a firing missed while serve
    # was down may still run, the zone a cron is read in when none is given, and routines a channel may have.
    routine_min_interval: float = 300.0
    routine_grace: float = 3600.0
    routine_tz: str = "UTC"
    routines_per_channel: int = 20
    api_token: str | None = field(default=None, repr=False)
    port: int = 3000
    server_url: str | None = None
    # Scale-out: sandboxed steps go to `autocode worker` processes through Celery on Redis when set.
    redis_url: str | None = field(default=None, repr=False)
    job_margin: float = 30.0  # seconds a remote job may take beyond its steps' timeouts
    job_transfer_mb: int = 32  # cap on a run's working files travelling with a job
    job_queue_timeout: float = 600.0  # seconds a job may wait in the queue for a worker (its steps' time starts later)
    redis_grace: float = 30.0  # seconds serve and workers ride out a Redis outage before giving up
    # Run viewer pages and the links to them.
    viewer: bool = True
    public_url: str | None = None
    # Slack
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_signing_secret: str | None = field(default=None, repr=False)
    slack_app_token: str | None = field(default=None, repr=False)  # Socket Mode
    slack_client_id: str | None = None  # with the secret: multi-workspace OAuth install
    slack_client_secret: str | None = field(default=None, repr=False)
    slack_api_url: str | None = None
    slack_allowed_teams: frozenset[str] = frozenset()
    slack_allowed_channels: frozenset[str] = frozenset()
    slack_allowed_users: frozenset[str] = frozenset()
    slack_admin_users: frozenset[str] = frozenset()  # may cancel and re-run anyone's runs
    slack_thread_replies: str = "auto"  # mention|auto|all: which replies in an AutoCode thread start a run
    # (title, message) pairs a new assistant thread suggests (bots/slack_assistant.py); () for none
    slack_suggested_prompts: tuple[tuple[str, str], ...] = DEFAULT_SUGGESTED_PROMPTS
    # Telegram
    telegram_bot_token: str | None = field(default=None, repr=False)
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: str | None = field(default=None, repr=False)
    telegram_api_url: str | None = None
    telegram_allowed_chats: frozenset[str] = frozenset()
    telegram_allowed_users: frozenset[str] = frozenset()
    telegram_admin_users: frozenset[str] = frozenset()  # numeric user ids that may cancel anyone's runs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        tools = env.get("AUTOCODE_TOOLS", "").strip()
        root = env.get("AUTOCODE_WORKDIR_ROOT", "").strip()
        prices = env.get("AUTOCODE_PRICES_FILE", "").strip()
        return cls(
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            openai_base_url=env.get("OPENAI_BASE_URL") or None,
            model=env.get("AUTOCODE_MODEL", "").strip() or DEFAULT_MODEL,
            llm_timeout=_float(env, "AUTOCODE_LLM_TIMEOUT", 120.0),
            llm_max_retries=_int(env, "AUTOCODE_LLM_MAX_RETRIES", 3, minimum=0),
            llm_startup_check=_choice(env, "AUTOCODE_LLM_STARTUP_CHECK", ("on", "off"), "on") == "on",
            llm_deadline=_float(env, "AUTOCODE_LLM_DEADLINE", 180.0),
            llm_stream=_choice(env, "AUTOCODE_LLM_STREAM", ("on", "off"), "on") == "on",
            llm_max_tokens_plan=_int(env, "AUTOCODE_LLM_MAX_TOKENS_PLAN", 1500, minimum=64),
            llm_max_tokens_evaluate=_int(env, "AUTOCODE_LLM_MAX_TOKENS_EVALUATE", 1200, minimum=64),
            llm_max_tokens_helper=_int(env, "AUTOCODE_LLM_MAX_TOKENS_HELPER", 1000, minimum=16),
            db_path=Path(env.get("AUTOCODE_DB", "").strip() or "autocode.db"),
            tools_file=Path(tools) if tools else None,
            max_iterations=_int(env, "AUTOCODE_MAX_ITERATIONS", 3),
            history_chars=_int(env, "AUTOCODE_HISTORY_CHARS", 4000, minimum=0),
            step_timeout=_float(env, "AUTOCODE_STEP_TIMEOUT", 60.0),
            step_memory_mb=_int(env, "AUTOCODE_STEP_MEMORY_MB", 1024, minimum=64),
            step_max_output_kb=_int(env, "AUTOCODE_STEP_MAX_OUTPUT_KB", 256),
            step_max_log_kb=_int(env, "AUTOCODE_STEP_MAX_LOG_KB", 64),
            workdir_mb=_int(env, "AUTOCODE_WORKDIR_MB", 256),
            workdir_root=Path(root) if root else None,
            tool_timeout=_float(env, "AUTOCODE_TOOL_TIMEOUT", 60.0),
            approval_timeout=_float(env, "AUTOCODE_APPROVAL_TIMEOUT", 600.0),
            step_max_procs=_int(env, "AUTOCODE_STEP_MAX_PROCS", 64),
            sandbox_backend=_choice(env, "AUTOCODE_SANDBOX_BACKEND", ("auto", "bwrap", "process"), "auto"),
            sandbox_network=_choice(env, "AUTOCODE_SANDBOX_NETWORK", ("off", "on"), "off") == "on",
            sandbox_warm=_int(env, "AUTOCODE_SANDBOX_WARM", 2, minimum=0),
            sandbox_uid_base=_int(env, "AUTOCODE_SANDBOX_UID_BASE", 61000, minimum=1000),
            sandbox_max_workers=_int(env, "AUTOCODE_SANDBOX_MAX_WORKERS", 64),
            artifact_max_mb=_int(env, "AUTOCODE_ARTIFACT_MAX_MB", 10),
            artifacts_max_mb=_int(env, "AUTOCODE_ARTIFACTS_MAX_MB", 25),
            artifacts_max_count=_int(env, "AUTOCODE_ARTIFACTS_MAX_COUNT", 10),
            input_max_mb=_int(env, "AUTOCODE_INPUT_MAX_MB", 50),
            input_max_files=_int(env, "AUTOCODE_INPUT_MAX_FILES", 10),
            workspace_mb=_int(env, "AUTOCODE_WORKSPACE_MB", 200),
            workspace_days=_int(env, "AUTOCODE_WORKSPACE_DAYS", 30),
            workspaces_max_mb=_int(env, "AUTOCODE_WORKSPACES_MAX_MB", 0, minimum=0),
            disk_reserve_mb=_int(env, "AUTOCODE_DISK_RESERVE_MB", 64, minimum=0),
            body_timeout=_float(env, "AUTOCODE_BODY_TIMEOUT", 30.0),
            max_concurrent_runs=_int(env, "AUTOCODE_MAX_CONCURRENT_RUNS", 32),
            sandbox_slots=_int(env, "AUTOCODE_SANDBOX_SLOTS", os.cpu_count() or 2),
            max_tokens_per_run=_int(env, "AUTOCODE_MAX_TOKENS_PER_RUN", 200_000, minimum=0),
            daily_tokens_per_user=_int(env, "AUTOCODE_DAILY_TOKENS_PER_USER", 0, minimum=0),
            models=tuple(dict.fromkeys(m.strip() for m in env.get("AUTOCODE_MODELS", "").split(",") if m.strip())),
            monthly_budget_per_user=_money(env, "AUTOCODE_MONTHLY_BUDGET_PER_USER"),
            prices_file=Path(prices) if prices else None,
            llm_calls_per_step=_int(env, "AUTOCODE_LLM_CALLS_PER_STEP", 20),
            mcp_calls_per_step=_int(env, "AUTOCODE_MCP_CALLS_PER_STEP", 50),
            mcp_result_kb=_int(env, "AUTOCODE_MCP_RESULT_KB", 256),
            llm_prompt_max_chars=_int(env, "AUTOCODE_LLM_PROMPT_MAX_CHARS", 20_000),
            shutdown_grace=_float(env, "AUTOCODE_SHUTDOWN_GRACE", 30.0),
            routine_min_interval=_float(env, "AUTOCODE_ROUTINE_MIN_INTERVAL", 300.0),
            routine_grace=_float(env, "AUTOCODE_ROUTINE_GRACE", 3600.0),
            routine_tz=_zone(env, "AUTOCODE_ROUTINE_TZ"),
            routines_per_channel=_int(env, "AUTOCODE_ROUTINES_PER_CHANNEL", 20),
            api_token=env.get("AUTOCODE_API_TOKEN") or None,
            port=_int(env, "PORT", 3000),
            server_url=env.get("AUTOCODE_SERVER_URL", "").strip() or None,
            redis_url=env.get("AUTOCODE_REDIS_URL", "").strip() or None,
            job_margin=_float(env, "AUTOCODE_JOB_MARGIN", 30.0),
            job_transfer_mb=_int(env, "AUTOCODE_JOB_TRANSFER_MB", 32),
            job_queue_timeout=_float(env, "AUTOCODE_JOB_QUEUE_TIMEOUT", 600.0),
            redis_grace=_float(env, "AUTOCODE_REDIS_GRACE", 30.0),
            viewer=_choice(env, "AUTOCODE_VIEWER", ("on", "off"), "on") == "on",
            public_url=env.get("AUTOCODE_PUBLIC_URL", "").strip().rstrip("/") or None,
            slack_bot_token=env.get("SLACK_BOT_TOKEN", "").strip() or None,
            slack_signing_secret=env.get("SLACK_SIGNING_SECRET", "").strip() or None,
            slack_app_token=env.get("SLACK_APP_TOKEN", "").strip() or None,
            slack_client_id=env.get("SLACK_CLIENT_ID", "").strip() or None,
            slack_client_secret=env.get("SLACK_CLIENT_SECRET", "").strip() or None,
            slack_api_url=env.get("SLACK_API_URL", "").strip() or None,
            slack_allowed_teams=_names(env, "SLACK_ALLOWED_TEAMS"),
            slack_allowed_channels=_names(env, "SLACK_ALLOWED_CHANNELS"),
            slack_allowed_users=_names(env, "SLACK_ALLOWED_USERS"),
            slack_admin_users=_names(env, "SLACK_ADMIN_USERS"),
            slack_thread_replies=_choice(env, "AUTOCODE_SLACK_THREAD_REPLIES", ("mention", "auto", "all"), "auto"),
            slack_suggested_prompts=_prompts(env, "AUTOCODE_SLACK_SUGGESTED_PROMPTS"),
            telegram_bot_token=env.get("TELEGRAM_BOT_TOKEN", "").strip() or None,
            telegram_webhook_url=env.get("TELEGRAM_WEBHOOK_URL", "").strip() or None,
            telegram_webhook_secret=env.get("TELEGRAM_WEBHOOK_SECRET", "").strip() or None,
            telegram_api_url=env.get("TELEGRAM_API_URL", "").strip() or None,
            telegram_allowed_chats=_names(env, "TELEGRAM_ALLOWED_CHATS"),
            telegram_allowed_users=_names(env, "TELEGRAM_ALLOWED_USERS"),
            telegram_admin_users=_names(env, "TELEGRAM_ADMIN_USERS"),
        )

    def with_overrides(self, **changes: object) -> "Settings":
        """A copy with CLI flags applied (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def llm_configured(self) -> bool:
        return bool(self.openai_api_key or self.openai_base_url)

    @property
    def allowed_models(self) -> tuple[str, ...]:
        """The models a channel may choose: AUTOCODE_MODEL first, then AUTOCODE_MODELS."""
        return tuple(dict.fromkeys((self.model, *self.models)))

    @property
    def slack_enabled(self) -> bool:
        return bool(self.slack_bot_token or self.slack_app_token or (self.slack_client_id and self.slack_client_secret))

    @property
    def telegram_enabled(self) -> bool:
        return bool(self.telegram_bot_token)

    def reply_cap(self, purpose: str) -> int:
        """The most tokens a reply for `purpose` (plan, evaluate, helper, probe) may have: its max_tokens."""
        return {"plan": self.llm_max_tokens_plan, "evaluate": self.llm_max_tokens_evaluate,
                "helper": self.llm_max_tokens_helper, "schedule": self.llm_max_tokens_helper}.get(purpose, 256)

    def require_llm(self) -> None:
        if not self.llm_configured:
            raise ConfigError(LLM_SETUP_HELP)
