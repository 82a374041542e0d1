"""Which attention core a training process ran, as its log says: the mark and the reader. Pure, no imports.

megaquant.ops.attention_core prints one line per distinct decision, `megaquant: attention core: fused
(triton) qk=mxfp8 pv=none` or `... unfused (<why>)`; `megaquant train` folds them into manifest.json
(`attention_core`) with `cores_in_log`. Shared by the trainer (torch) and the launcher (no torch), as
megaquant.pathcounts is for the path counts.
"""

from __future__ import annotations

__all__ = ["ATTENTION_MARK", "cores_in_log"]

ATTENTION_MARK = "megaquant: attention core:"
"""Start of the line megaquant.ops.attention_core prints for each distinct decision (fused / unfused)."""


def cores_in_log(text: str) -> list[str]:
    """The attention-core decisions in a training log (text after the mark), in order, each once."""
    found = [line.split(ATTENTION_MARK, 1)[1].strip() for line in text.splitlines() if ATTENTION_MARK in line]
    return list(dict.fromkeys(found))
