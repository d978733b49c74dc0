"""ONNX op converters. Importing this package fills the registry."""
from . import controlflow, elementwise, indexing, nn, recurrent, resize, tensor  # noqa: F401  (registration on import)
from .registry import Node, get_converter, register, supported_ops

__all__ = ["Node", "get_converter", "register", "supported_ops"]
