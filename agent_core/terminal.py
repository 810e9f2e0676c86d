"""Text that generated code or the LLM can influence, made safe to print on a terminal.

Step errors, tracebacks, stdout/stderr, outputs, answers, tool and artifact names and evaluator text are
untrusted: printed raw, an escape sequence can erase or rewrite lines (a fake "ok" in the progress), clear the
screen, set the window title or write the clipboard (OSC 52), and a carriage return or a bidi override can make
a line show something other than what it holds. Everything the CLI prints from a run goes through here first.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["safe_for_terminal", "json_for_terminal"]

# Whole escape sequences, so their parameters do not linger as litter: CSI (7-bit ESC [ or 8-bit U+009B);
# OSC, DCS, SOS, PM and APC strings up to their terminator (BEL or ST); any other ESC + intermediates + final
# (ESC c, ESC 7, ESC ( B …). An unterminated string loses only its introducer: the rest stays visible, never hidden.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]"
)
# What is left after that: C0 controls but \t and \n, DEL, C1 controls, bidi embeddings/overrides/isolates.
# With none of them in the output, no new sequence can form from what remains.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates (undecodable bytes) would make print() raise
_LINE_BREAKS = re.compile("[\n\t\u2028\u2029]")
# Escaped inside JSON strings for the terminal: what json.dumps(ensure_ascii=False) leaves raw.
_JSON_RAW = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def safe_for_terminal(text: object, *, single_line: bool = False) -> str:
    """`text` without anything a terminal would act on; ordinary Unicode (accents, CJK, emoji) is kept.

    Escape sequences and control characters are removed, except newline and tab; a carriage return (alone or in
    CRLF) becomes a newline, so nothing can be overwritten; bidi overrides and isolates are dropped, so nothing can
    be reordered; lone surrogates become U+FFFD. With `single_line`, newlines and tabs become spaces too: for
    text placed inside one line of ours (a progress line, a field), where a line break would let it forge the next
    line. None gives "", anything else that is not a string its str().
    """
    if text is None:
        return ""
    text = text if isinstance(text, str) else str(text)
    text = _SEQUENCE.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SURROGATE.sub("\ufffd", _CONTROL.sub("", text))
    return _LINE_BREAKS.sub(" ", text) if single_line else text


def json_for_terminal(value: Any, **dumps_options: Any) -> str:
    """`json.dumps(value, **dumps_options)` with the characters it leaves raw under `ensure_ascii=False` (DEL, C1
    controls such as the 8-bit CSI U+009B, bidi overrides, lone surrogates) written as \\uXXXX escapes.

    The JSON decodes to exactly the same value: those characters occur only inside strings, where the escape is
    valid. (json.dumps escapes C0 controls, ESC included, in every mode.)
    """
    return _JSON_RAW.sub(lambda match: f"\\u{ord(match.group()):04x}", json.dumps(value, **dumps_options))
