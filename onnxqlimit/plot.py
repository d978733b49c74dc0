"""`--plot P.png`: per-layer widths and output SQNR of a run, from its report (needs
matplotlib: pip install 'onnxqlimit[plot]')."""
from __future__ import annotations

from pathlib import Path

from .errors import QLimitError
from .report import Report


def plot_layers(report: Report, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        import matplotlib.pyplot as plt
    except ImportError:
        raise QLimitError("--plot needs matplotlib: pip install 'onnxqlimit[plot]'") from None
    nodes = [n for n in report.nodes if "weight" in n]
    if not nodes:
        raise QLimitError("--plot: no quantized layers to plot")
    x = range(len(nodes))
    wbits = [n["weight"]["bits"] for n in nodes]
    abits = [max((v["bits"] for k, v in n.items() if k.startswith("input ")), default=0) for n in nodes]
    sqnr = [n["output_sqnr_db"] if n["output_sqnr_db"] is not None else float("nan") for n in nodes]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(nodes) * 0.12), 6), sharex=True)
    top.step(x, wbits, where="mid", label="weight bits")
    top.step(x, abits, where="mid", label="input bits", linestyle="--")
    top.set_ylabel("bits")
    top.legend(loc="upper right")
    bottom.plot(x, sqnr, marker=".", linewidth=1)
    bottom.set_ylabel("output SQNR vs float (dB)")
    bottom.set_xlabel("quantized layer, in graph order")
    fig.suptitle(f"{Path(report.output).name}: per-layer widths and SQNR")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
