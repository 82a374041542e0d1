"""What the benchmark drivers share about the `megaquant train` processes they start."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any


def interrupt(procs: Sequence[subprocess.Popen[Any]], wait_s: float) -> None:
    """Ctrl-C, not a kill, for each `megaquant train` at once: it stops torchrun, records `interrupted` and
    restores the tree, so the next run starts from the instrumented base. Then wait for them together;
    whatever is left after `wait_s` is killed."""
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + wait_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
