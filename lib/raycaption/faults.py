"""Fault injection for the fault tests: off unless ``RAYCAPTION_FAULTS`` is set.

``RAYCAPTION_FAULTS`` is a comma-separated list of ``<point>_<action>:<count>`` and
``RAYCAPTION_FAULT_DIR`` a folder every process of the (single-machine) test cluster shares.
The first ``count`` times any process reaches ``point``, the action runs:

- ``exit``: the process dies at once (``os._exit``), as on OOM or preemption;
- ``raise``: the code raises, as a failing library call would;
- ``delay``: the code sleeps 0.5 s (slows a run down so a test can interrupt it).

Each occurrence is claimed by creating a file exclusively, so counts hold across processes
and across Ray's retries. Points: ``caption`` (each caption batch), ``write`` (mid-way
through writing a Parquet file).
"""

from __future__ import annotations

import os
import time

ENV = "RAYCAPTION_FAULTS"
DIR_ENV = "RAYCAPTION_FAULT_DIR"


class InjectedFault(RuntimeError):
    """Raised by the ``raise`` action."""


def maybe_fault(point: str) -> None:
    """Run the configured action if ``point`` still has occurrences left."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, count = item.strip().partition(":")
        target, _, action = name.rpartition("_")
        if target != point or not _claim(name, int(count or 1)):
            continue
        if action == "exit":
            os._exit(1)
        if action == "raise":
            raise InjectedFault(f"injected fault at {point}")
        if action == "delay":
            time.sleep(0.5)


def _claim(name: str, count: int) -> bool:
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise RuntimeError(f"{ENV} is set but {DIR_ENV} is not")
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        try:
            fd = os.open(os.path.join(folder, f"{name}-{i}"), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        os.close(fd)
        return True
    return False
