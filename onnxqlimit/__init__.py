"""onnxqlimit: post-training quantization of ONNX models (BRECQ / QDrop / mixed precision).

Pipeline: load -> mirror -> calibrate -> mixed precision -> reconstruct -> export -> validate.
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

# torch's OpenMP (libgomp) spins 300000 rounds at every barrier before it sleeps. Beside
# another busy process the spinning thread holds the core its partner needs, and 2-thread
# blocks ran 4.8x slower; 1000 rounds brings that under 3x for about 6% idle time on the
# smallest nets (docs/reconstruction.md). libgomp reads this once, when torch loads: so only
# before torch is imported, and never over the user's own GOMP_SPINCOUNT / OMP_WAIT_POLICY.
if "torch" not in _sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "1000"

from .context import Context, RunOptions  # noqa: E402
from .errors import QLimitError, UnsupportedModelError  # noqa: E402
from .load import LoadConfig, load_model  # noqa: E402
from .mirror import Mirror  # noqa: E402
from .mixed.config import MixedConfig, SensitivityConfig, Targets  # noqa: E402
from .pipeline import QuantizeResult, place_and_calibrate, prepare, quantize  # noqa: E402
from .quant.config import Placement, QuantConfig, Scheme, Widths  # noqa: E402
from .recon.config import ReconConfig  # noqa: E402
from .report import Report  # noqa: E402
from .shared_budget import PipelineResult, Stage, quantize_pipeline  # noqa: E402

__all__ = ["Context", "LoadConfig", "Mirror", "MixedConfig", "Placement", "QLimitError", "QuantConfig",
           "PipelineResult", "QuantizeResult", "ReconConfig", "Report", "RunOptions", "Scheme", "SensitivityConfig",
           "Stage", "Targets", "UnsupportedModelError", "Widths", "load_model", "place_and_calibrate", "prepare",
           "quantize", "quantize_pipeline", "__version__"]
