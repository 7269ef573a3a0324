"""Suite-wide setup that must happen before any test module is imported.

Triton decides at decoration time whether a kernel is interpreted: TRITON_INTERPRET has to be
set before the first import of ring_rl's Triton modules, and collection order decides which
test file imports them first (the alignment tests import the model, hence the kernels, before
the kernel tests run). On a machine without CUDA the Triton kernels can only run interpreted.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
