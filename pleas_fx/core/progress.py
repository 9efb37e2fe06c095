"""Progress bars for long work: shown on a terminal, silent elsewhere (logs, CI, pipes)."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


def progress_bar(items: Iterable, enabled: bool | None, **kwargs) -> Iterable:
    """`items` wrapped in a tqdm bar on stderr when `enabled` is True, or when it is None and
    stderr is a terminal; `items` itself otherwise."""
    if enabled is None:
        enabled = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(items, **kwargs) if enabled else items
