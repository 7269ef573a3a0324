"""freeze_startup_objects: the collector skips the start-up's objects, and exit still frees them."""
from __future__ import annotations

import subprocess
import sys

_CHILD = """
import gc, sys
import triton  # its nanobind bindings report objects still alive after the final collection
{freeze}
print(gc.get_freeze_count() > 10000, flush=True)
"""


def _run(freeze: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD.format(freeze=freeze)], capture_output=True,
                          text=True, timeout=300, check=True)


def test_frozen_start_up_is_freed_at_exit():
    plain = _run("gc.freeze()")  # the failure this guards against: frozen objects outlive exit
    assert plain.stdout.strip() == "True" and "nanobind: leaked" in plain.stderr
    ours = _run("from ring_rl.gc_startup import freeze_startup_objects; freeze_startup_objects()")
    assert ours.stdout.strip() == "True"
    assert "leaked" not in ours.stderr, ours.stderr[-2000:]
