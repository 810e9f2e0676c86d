"""agent_core.terminal: what untrusted text may still do on a terminal once it went through it (nothing)."""

from __future__ import annotations

import json

import pytest

from agent_core.terminal import json_for_terminal, safe_for_terminal

# Everything a terminal acts on: C0 (but \t, \n), DEL, C1, and the bidi overrides/isolates.
ACTORS = {chr(c) for c in [*range(0x00, 0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0),
                           *range(0x202a, 0x202f), *range(0x2066, 0x206a)]}


def acting(text: str) -> list[str]:
    return sorted({c for c in text if c in ACTORS}, key=ord)


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[2K\r  [1.1/1] fake ok", "\n  [1.1/1] fake ok"),  # erase line + return: the return becomes a newline
    ("a\x1b[31;1mred\x1b[0m b", "ared b"),  # SGR
    ("\x1b[?1049h\x1b[2J\x1b[H", ""),  # private mode, clear, home
    ("x\x1b]52;c;ZXZpbA==\x07y", "xy"),  # OSC 52 clipboard write, BEL-terminated
    ("x\x1b]0;pwned title\x1b\\y", "xy"),  # OSC 0 title, ST-terminated
    ("x\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\y", "xlinky"),  # hyperlink
    ("x\x1bP+q544e\x1b\\y", "xy"),  # DCS (XTGETTCAP)
    ("x\x1b_apc\x1b\\y\x1b^pm\x1b\\z\x1bXsos\x1b\\", "xyz"),  # APC, PM, SOS
    ("x\x1bcy\x1b7z\x1b8\x1b(B", "xyz"),  # reset, save/restore cursor, charset
    ("x\x9b2Jy\x9d52;c;QQ==\x9cz", "xyz"),  # 8-bit CSI and OSC (ST U+009C)
    ("x\x1b]52;c;unterminated", "x52;c;unterminated"),  # nothing hidden: only the introducer goes
    ("x\x1b[2", "x2"),  # a cut CSI
    ("\x1b\x1b[2J", ""),  # ESC ESC
    ("a\x00b\x08c\x7fd\x85e\x0bf\x0cg", "abcdefg"),  # NUL, backspace, DEL, NEL, VT, FF
    ("one\r\ntwo\rthree", "one\ntwo\nthree"),  # CRLF and lone CR: nothing can be overwritten
    ("\u202egnp.exe \u2066x\u2069 \u202a\u202b\u202c\u202d", "gnp.exe x "),  # bidi overrides and isolates
    ("tab\tnew\nline", "tab\tnew\nline"),  # kept
    ("Zürich 東京 🙂‍↕️ עברית مرحبا \u200d", "Zürich 東京 🙂‍↕️ עברית مرحبا \u200d"),  # ordinary Unicode kept
    ("bad \ud800 surrogate", "bad \ufffd surrogate"),  # would make print() raise
    ("", ""),
])
def test_safe_for_terminal(raw, shown):
    assert safe_for_terminal(raw) == shown
    assert not acting(safe_for_terminal(raw))


def test_single_line_keeps_text_inside_one_line():
    assert safe_for_terminal("KeyError:\n  [1.1/1] ok\r\tx\u2028y", single_line=True) == "KeyError:   [1.1/1] ok  x y"
    assert "\n" not in safe_for_terminal("\x1b[2K\r\n\n", single_line=True)


def test_none_and_non_strings():
    assert safe_for_terminal(None) == ""
    assert safe_for_terminal(42) == "42"
    assert safe_for_terminal(ValueError("bad\x1b[2Jthing")) == "badthing"


def test_no_sequence_can_be_assembled_from_the_remains():
    # Removing one piece must not join two others into a sequence: the output holds no ESC or C1 at all.
    for raw in ("\x1b\x00[2J", "\x1b\x1b]52;c;QQ==\x07", "\x1b[\x1b[2J", "\x9b\x1b[31m", "\x1b" * 5 + "[" * 5):
        assert not acting(safe_for_terminal(raw)), repr(raw)


def test_every_single_code_point_below_0x3000_is_either_kept_or_dropped():
    for code in range(0x3000):
        char = chr(code)
        out = safe_for_terminal(f"a{char}é")  # (é: no escape sequence ends in it)
        assert not acting(out), hex(code)
        assert out in (f"a{char}é", "aé", "a\né"), hex(code)


def test_json_for_terminal_is_the_same_json_without_raw_controls():
    value = {"stdout": "\x1b[2K\r fake ok \x9b2J \u202eexe \x7f \ud800 Zürich", "n": [1, 2.5, None, True]}
    text = json_for_terminal(value, ensure_ascii=False, indent=2)
    assert json.loads(text) == value
    assert not acting(text)
    assert "Zürich" in text  # ordinary Unicode stays readable
    assert json_for_terminal({"a": "b"}) == json.dumps({"a": "b"})
