"""Entrypoint for `ray job submit -- python jobs/caption.py --input … --output … --model …`.

Thin on purpose: arguments -> config -> pipeline -> exit code, all in raycaption.cli.
"""

import pathlib
import sys

# Under `ray job submit --working-dir .` the package is not installed: use the checkout's copy.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lib"))

from raycaption.cli import entrypoint

if __name__ == "__main__":
    sys.exit(entrypoint(["caption", *sys.argv[1:]]))
