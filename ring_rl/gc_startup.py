"""Keep the cyclic garbage collector off the objects a long-running process starts with.

A driver or actor process of ring-rl imports torch, transformers, DeepSpeed and Ray: ~400K
objects that live as long as the process. Every full collection walked them all (~90 ms on the
2-core CPU machine, one every ~15 GRPO steps on the tiny model). `gc.freeze()` moves them to a
generation the collector skips. At exit they are unfrozen, so Python's final collection still
frees them; frozen, they stay alive past it and extension modules report them (Triton's
nanobind bindings print "nanobind: leaked ... instances!").
"""
from __future__ import annotations

import atexit
import gc


def freeze_startup_objects() -> None:
    """Freeze what is alive now; call once start-up is over (in processes ring-rl owns only:
    a library call that froze a user's objects would keep them from ever being collected)."""
    gc.freeze()
    atexit.register(gc.unfreeze)  # a second registration (a restarted run) unfreezes nothing new
