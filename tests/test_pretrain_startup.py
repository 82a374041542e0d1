"""megaquant's pretrain entry hands Megatron's startup timers the worker's start and the end of its imports
(megatron-core >= 0.17: `training.set_startup_timestamps`), and registers nothing on an older Megatron."""

from __future__ import annotations

import time
from types import SimpleNamespace

from megaquant.launch import pretrain


def test_the_worker_start_and_main_entry_reach_megatrons_startup_timers() -> None:
    seen: dict[str, float] = {}
    training = SimpleNamespace(set_startup_timestamps=lambda **kw: seen.update(kw))
    entry = time.time()
    pretrain._register_startup(training, entry)
    assert seen == {"program_start": pretrain._PROGRAM_START, "main_entry": entry}
    assert seen["program_start"] <= seen["main_entry"]  # the module was imported before main() ran


def test_an_older_megatron_without_the_hook_gets_nothing() -> None:
    pretrain._register_startup(SimpleNamespace(), time.time())  # no attribute: no error, nothing to call
