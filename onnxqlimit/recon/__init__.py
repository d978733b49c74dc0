"""Stage 5: BRECQ / QDrop reconstruction (docs/reconstruction.md).

blocks.py finds the blocks in the graph, block_cache.py keeps the tensors crossing them,
runner.py runs one block over the cached samples, fisher.py weighs its loss, tune.py
tunes it, reconstruct.py drives the loop.
"""
from .reconstruct import METHODS, PRESETS, ReconConfig, ReconResult, reconstruct  # noqa: F401
