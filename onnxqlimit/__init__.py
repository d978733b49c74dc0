"""onnxqlimit: post-training quantization of ONNX models (BRECQ / QDrop / mixed precision).

Pipeline: load -> mirror -> calibrate -> mixed precision -> reconstruct -> export -> validate.
"""
__version__ = "0.1.0"

from .errors import QLimitError, UnsupportedModelError  # noqa: E402
from .load import LoadConfig, load_model  # noqa: E402
from .mirror import Mirror  # noqa: E402
from .quant.policy import QuantConfig  # noqa: E402
from .quantize import QuantizeResult, RunOptions, quantize  # noqa: E402

__all__ = ["LoadConfig", "Mirror", "QLimitError", "QuantConfig", "QuantizeResult", "RunOptions",
           "UnsupportedModelError", "load_model", "quantize", "__version__"]
