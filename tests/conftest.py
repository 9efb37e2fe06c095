"""Shared test setup: one thread per worker (the CI machine has 2 cores shared by 2 xdist
workers) and the repository root and tests/ importable (helpers live in tests/nets.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # `import nets` from any test module
    sys.path.insert(0, HERE)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
