"""Synthetic inputs for models whose real data we do not ship (PP-OCR)."""
from __future__ import annotations

import numpy as np


def paddle_text_image(batch: int, height: int, width: int, seed: int = 0):
    """Dark text-like strokes on a light page, normalised as PP-OCR expects (NCHW float32).

    Random normal noise drives PP-OCR det to an all-background map (max 5e-4), where a
    relative error measures nothing; strokes give it real text regions to respond to.
    """
    rng = np.random.default_rng(seed)
    img = np.full((batch, height, width, 3), 235.0)
    for b in range(batch):
        for _ in range(max(3, height * width // 10000)):
            h = int(rng.integers(12, min(30, height - 4)))
            w = int(rng.integers(40, min(220, width // 2)))
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            img[b, y:y + h, x:x + w] = rng.integers(0, 80)
            img[b, y + 2:y + h - 2:4, x:x + w:3] = 235  # gaps, so regions look like glyph rows
    img += rng.normal(0, 6, img.shape)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((img / 255 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
