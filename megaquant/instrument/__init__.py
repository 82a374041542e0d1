"""`megaquant instrument`: hook stock Megatron's GEMMs to `megaquant.ops` with a libcst codemod.

Modules by concept: `rules` (the TOML rules as dataclasses), `gemms` (finding GEMMs by kind, through
module-level helpers), `transform` (one file, bytes in / bytes out), `plan` (all transforms over a tree,
pure; the place for further transforms), `attention` (the fused-attention-core rewrite, run after the
plan), `repo` (the git and file edge), `cli` (the command).
"""

from __future__ import annotations

from megaquant.instrument.cli import register
from megaquant.instrument.plan import InstrumentPlan, Transform, plan_instrument
from megaquant.instrument.repo import InstrumentResult, copy_installed, instrument_repo, read_sources
from megaquant.instrument.rules import (
    DEFAULT_BRANCH,
    Hook,
    InstrumentError,
    InstrumentRules,
    Unhooked,
    load_rules,
    rules_path,
)
from megaquant.instrument.transform import Edit

__all__ = [
    "DEFAULT_BRANCH",
    "Edit",
    "Hook",
    "InstrumentError",
    "InstrumentPlan",
    "InstrumentResult",
    "InstrumentRules",
    "Transform",
    "Unhooked",
    "copy_installed",
    "instrument_repo",
    "load_rules",
    "plan_instrument",
    "read_sources",
    "register",
    "rules_path",
]
