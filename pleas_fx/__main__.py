"""`python -m pleas_fx ...` is the `pleas-fx` command (pleas_fx/apps/cli.py)."""
import sys

from pleas_fx.apps.cli import main

sys.exit(main())
