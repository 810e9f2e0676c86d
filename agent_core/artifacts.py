"""Which of a run's output files are kept and posted, and what the answer says about the rest.

A step may write thousands of files under outputs/; a chat channel should get a handful. The first
`max_count` files (in name order) are kept one by one, every other collected file goes into one
`more-outputs.zip`, and files the sandbox did not hand over (over the size or count caps, or not regular
files) are counted, so the answer can say exactly what was left out.
"""

from __future__ import annotations

import io
import zipfile

from agent_core.sandbox import Artifact, CollectedOutputs

BUNDLE_NAME = "more-outputs.zip"


def select_artifacts(collected: CollectedOutputs, max_count: int) -> tuple[list[Artifact], str | None]:
    """The artifacts to store (at most `max_count` + 1) and a sentence for the answer, or None when all
    files are kept as they are."""
    files = sorted(collected.artifacts, key=lambda a: a.name)
    kept, rest = files[:max_count], files[max_count:]
    parts: list[str] = []
    if rest:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
            for artifact in rest:
                bundle.writestr(artifact.name, artifact.data)
        kept.append(Artifact(BUNDLE_NAME, buffer.getvalue(), "application/zip"))
        parts.append(f"the first {max_count} of the {len(files)} collected files are attached one by one, the "
                     f"other {len(rest)} are in {BUNDLE_NAME}")
    if collected.left_out is None:
        parts.append("the output files could not all be collected")
    elif collected.left_out:
        written = len(files) + collected.left_out
        examples = "; ".join(collected.skipped[:3])
        parts.append(f"{collected.left_out:,} of the {written:,} files written were left out (over the size or "
                     f"count caps, or not regular files{': ' + examples if examples else ''})")
    if not parts:
        return kept, None
    sentence = "; ".join(parts)
    return kept, f"Files: {sentence[0].upper()}{sentence[1:]}."


__all__ = ["BUNDLE_NAME", "select_artifacts"]
