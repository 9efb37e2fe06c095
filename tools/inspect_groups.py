"""Show the permutation groups pleas_fx infers for a model (what a merge would merge, and
which hidden axes stay frozen, and why). Same as `pleas-fx inspect`.

    python tools/inspect_groups.py resnet18 --input-shape 1,3,64,64
    python tools/inspect_groups.py convnext_tiny --input-shape 1,3,64,64 --check
    python tools/inspect_groups.py my_pkg.nets:build --input-shape 2,32 --json report.json
    python tools/inspect_groups.py resnet18 --json -            # JSON on stdout
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pleas_fx.apps.inspect_command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="inspect_groups"))
