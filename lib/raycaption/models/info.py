"""What the driver knows about a model before any weights load (no torch import here, so
CPU stages that carry a ModelInfo stay light)."""

from __future__ import annotations

from dataclasses import dataclass

from raycaption.images import ResizeSpec


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns about a model without loading its weights.

    Attributes:
        name: The reference the user gave (hub id or folder URL).
        family: ``git``, ``blip`` or ``blip-2``.
        model_type: The config's ``model_type``.
        resize_spec: Geometry of the model's image processor.
        remote: True when the folder lives on object storage and must be fetched by workers.
    """

    name: str
    family: str
    model_type: str
    resize_spec: ResizeSpec
    remote: bool
