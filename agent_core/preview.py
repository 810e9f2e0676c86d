"""Short previews of a run's input files, made INSIDE the run's sandbox: this module's source is run as a trusted step
(agent_core.manifest), so an untrusted file is parsed only by sandboxed code, under a step's limits.

It imports nothing from AutoCode (it runs as a step's code) and only the standard library at module level; openpyxl
is imported when an Excel file is there. Each preview is at most PREVIEW_CHARS characters; a file that breaks its
previewer gets "preview failed: …" and the others go on.
"""

import csv
import io
import json
import os
import struct

PREVIEW_CHARS = 400
SNIFF_BYTES = 64 * 1024
JSON_MAX_BYTES = 5 * 1024 * 1024
SHOWN_COLUMNS = 12
SHOWN_ROWS = 3
CELL_CHARS = 40


def preview_inputs(data: dict) -> dict:
    """{"previews": {name: text}} for the files `data["files"]` names, relative to the working directory."""
    previews = {}
    for name in data.get("files", []):
        try:
            text = _preview(name)
        except Exception as exc:  # noqa: BLE001 - a bad file gets a note, never the run's end
            text = f"preview failed: {type(exc).__name__}: {str(exc)[:120]}"
        previews[name] = _clip(text, PREVIEW_CHARS)
    return {"previews": previews}


def _clip(text, limit):
    text = "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(value):
    return _clip(" ".join(str(value).split()), CELL_CHARS)


def _row(cells, total=None):
    cells = list(cells)
    shown = [_cell(c) for c in cells[:SHOWN_COLUMNS]]
    more = (len(cells) if total is None else total) - SHOWN_COLUMNS
    return " | ".join(shown) + (f" | … (+{more} columns)" if more > 0 else "")


def _preview(path):
    lower = path.lower()
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if lower.endswith((".xlsx", ".xlsm")):
        return _excel(path)
    image = _image_size(head)
    if image:
        return image
    if lower.endswith(".json"):
        return _json(path)
    if lower.endswith((".csv", ".tsv")):
        return _csv(path, head, "\t" if lower.endswith(".tsv") else None)
    if b"\0" in head:
        return "binary file"
    return _text(head)


def _csv(path, head, delimiter):
    sample = head.decode("utf-8", "replace")
    if b"\0" in head:
        return "not a text CSV (it contains NUL bytes)"
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(sample[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    csv.field_size_limit(1 << 20)  # a field over 1 MB: the file is refused, not read into memory
    shown, count = [], 0  # (first cells, number of cells) of the header and the first rows
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.reader(handle, delimiter=delimiter):
            if len(shown) < SHOWN_ROWS + 1:
                shown.append((row[:SHOWN_COLUMNS], len(row)))
            count += 1  # the step's time limit bounds this; inputs are capped by AUTOCODE_INPUT_MAX_MB
    if not shown:
        return "empty CSV"
    header, columns = shown[0]
    lines = [f"CSV, delimiter {delimiter!r}, {columns} columns, {count - 1} data rows",
             "header: " + _row(header, columns)]
    lines += ["row: " + _row(cells, total) for cells, total in shown[1:]]
    return "\n".join(lines)


def _excel(path):
    import openpyxl  # on use: a worker without Excel files never loads it

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        lines = [f"Excel workbook, sheets: {', '.join(_cell(n) for n in book.sheetnames[:10])}"]
        for sheet in book.worksheets[:3]:
            header = next(sheet.iter_rows(min_row=1, max_row=1, max_col=SHOWN_COLUMNS + 1, values_only=True), ())
            size = f"{sheet.max_row} rows" if sheet.max_row else "size unknown"
            lines.append(f"sheet {_cell(sheet.title)} ({size}): " + _row(["" if v is None else v for v in header]))
        return "\n".join(lines)
    finally:
        book.close()


def _json(path):
    size = os.path.getsize(path)
    if size > JSON_MAX_BYTES:
        return f"JSON, {size} bytes (too large to preview its shape)"
    with open(path, "rb") as handle:
        value = json.loads(handle.read().decode("utf-8", "replace"))
    return "JSON " + _shape(value, 2)


def _shape(value, depth):
    if isinstance(value, dict):
        keys = list(value)[:12]
        inner = ", ".join(f"{_cell(k)}: {_shape(value[k], depth - 1) if depth > 0 else type(value[k]).__name__}"
                          for k in keys)
        return f"object with {len(value)} keys {{{inner}{', …' if len(value) > 12 else ''}}}"
    if isinstance(value, list):
        first = _shape(value[0], depth - 1) if value and depth > 0 else ""
        return f"array of {len(value)}" + (f", first: {first}" if first else "")
    return type(value).__name__


def _text(head):
    text = head.decode("utf-8", "replace")
    lines = text.splitlines()[:5]
    return "text, first lines:\n" + "\n".join(_clip(line, 120) for line in lines)


def _image_size(head):
    """Width x height from the PNG, GIF or JPEG header (no image library)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return f"PNG image {width}x{height}"
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return f"GIF image {width}x{height}"
    if head.startswith(b"\xff\xd8"):
        stream = io.BytesIO(head)
        stream.read(2)
        while True:
            marker = stream.read(2)
            if len(marker) < 2 or marker[0] != 0xFF:
                return "JPEG image"
            length_bytes = stream.read(2)
            if len(length_bytes) < 2:
                return "JPEG image"
            (length,) = struct.unpack(">H", length_bytes)
            if marker[1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                data = stream.read(5)
                if len(data) < 5:
                    return "JPEG image"
                height, width = struct.unpack(">HH", data[1:5])
                return f"JPEG image {width}x{height}"
            stream.seek(length - 2, 1)
    return None
