"""Entrypoint for `ray job submit -- python jobs/finetune.py --train … --output … --model …`.

Thin on purpose: arguments -> config -> Ray Train run -> exit code, all in raycaption.cli.
Resubmitting the same command resumes the run from its latest checkpoint.
"""

import pathlib
import sys

# Under `ray job submit --working-dir .` the package is not installed: use the checkout's copy.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lib"))

from raycaption.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
