"""Datasets (batch format in docs/ARCHITECTURE.md) and the config-driven DataModule.

`ldm.data.datamodule.DataModuleFromConfig` imports Lightning and is therefore not imported here.
"""
from ldm.data.image_folder import ImageFolder
from ldm.data.photos import Photos
from ldm.data.shapes import COLORS, SHAPE_CLASSES, Shapes

__all__ = ["COLORS", "SHAPE_CLASSES", "ImageFolder", "Photos", "Shapes"]
