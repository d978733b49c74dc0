"""Stage 3: mixed precision - per-quantizer bit widths chosen under a budget (docs/mixed_precision.md)."""
