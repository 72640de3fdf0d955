"""Fine-tuning on Ray Train and evaluation of captioning models.

data.py (pairs, split, fingerprint, images) -> loop.py (the worker loop) -> export.py (best
checkpoint to --output) -> evaluate.py (metrics.py, eval card); run.py wires them together.
"""

from __future__ import annotations

__all__ = ["run_evaluate", "run_finetune"]


def __getattr__(name: str):
    # Lazy: importing raycaption.train must not import torch or Ray.
    if name in __all__:
        from raycaption.train import run

        return getattr(run, name)
    raise AttributeError(name)
