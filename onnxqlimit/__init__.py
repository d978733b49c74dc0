"""onnxqlimit: post-training quantization of ONNX models (BRECQ / QDrop / mixed precision).

Pipeline: load -> mirror -> calibrate -> reconstruct -> mixed precision -> export -> validate.
"""
__version__ = "0.1.0"

from .errors import QLimitError, UnsupportedModelError  # noqa: E402
from .load import LoadConfig, load_model  # noqa: E402
from .mirror import Mirror  # noqa: E402

__all__ = ["LoadConfig", "Mirror", "QLimitError", "UnsupportedModelError", "load_model", "__version__"]
