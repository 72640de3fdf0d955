"""raycaption: caption, tag and embed millions of images on a Ray cluster."""

__version__ = "0.1.0"
