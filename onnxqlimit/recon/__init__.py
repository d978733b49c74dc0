"""Stage 4: BRECQ / QDrop reconstruction (docs/reconstruction.md).

blocks.py finds the blocks in the graph, block_cache.py keeps the tensors crossing them,
runner.py runs one block over the cached samples, fisher.py weighs its loss, tune.py
tunes it, reconstruct.py drives the loop; config.py holds the settings, results.py what
is reported.
"""
from .config import METHODS, PRESETS, ReconConfig  # noqa: F401
from .reconstruct import reconstruct  # noqa: F401
from .results import BlockResult, ReconResult  # noqa: F401
