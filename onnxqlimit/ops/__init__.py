"""ONNX op converters. Importing this package fills the registry."""
from . import elementwise, nn  # noqa: F401  (registration on import)
from .registry import Node, get_converter, register, supported_ops

try:  # modules written alongside; registration on import
    from . import tensor, resize  # noqa: F401
except ImportError:  # pragma: no cover - transitional while they are written
    pass

__all__ = ["Node", "get_converter", "register", "supported_ops"]
