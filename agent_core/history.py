"""What a run leaves in its conversation's history, which later plans read (issue 20).

A run that succeeded leaves its answer. One that did not leaves a short neutral note, never its error: error text
carries URLs, setting names and tracebacks, and a small model copies what it reads in its prompt into its next plan
(a failed run's "The LLM at http://… did not answer" came back as a subtask named AUTOCODE_LLM_DEADLINE). The
user still gets the full error in the run's reply, log and page; the history only needs to know that the previous
task got no answer, and roughly why.
"""

from __future__ import annotations

# Why a run ended without an answer, as the loop classifies it.
NOTES = {
    "unreachable": "The previous task failed: the model could not be reached.",
    "plan": "The previous task failed: the model's plan could not be used.",
    "evaluate": "The previous task failed: its results could not be checked.",
    "steps": "The previous task failed: its steps did not produce an answer.",
    "files": "The previous task failed: its files could not be used.",
    "sandbox": "The previous task failed: its code could not be run.",
    "budget": "The previous task was stopped: a usage budget was reached.",
    "cancelled": "The previous task was cancelled before it finished.",
    "interrupted": "The previous task was interrupted by a server restart.",
}
DEFAULT_NOTE = "The previous task failed without an answer."


def note(kind: str | None) -> str:
    """The history's line for a run that ended without an answer, in parentheses so that it reads as a note."""
    return f"({NOTES.get(kind or '', DEFAULT_NOTE)})"


__all__ = ["DEFAULT_NOTE", "NOTES", "note"]
