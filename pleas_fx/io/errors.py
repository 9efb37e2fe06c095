"""SaveError, in a module of its own: every part of saving raises it (the allow-list, the
argument codec, the module and graph records), and pleas_fx.io re-exports it."""
from __future__ import annotations

from pleas_fx.core.errors import PleasError


class SaveError(PleasError):
    """The model cannot be written in the saved-model format (a class or function outside the
    allow-list, a constructor argument that cannot be recovered, ...)."""
