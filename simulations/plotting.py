"""What every fedquant plot shares: one colour per codec, legends beside the axes.

A codec keeps its colour in every figure of every report, because the colour is a function
of its label alone: each family has its own colour map (EDEN blues, DRIVE purples, QUIC-FL
oranges, ...) and more bits give a darker shade; biased and error-feedback variants are
dashed. fp32 is always black. Legends go outside the axes, so they never cover a series.
"""

from __future__ import annotations

import re
import zlib

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window
import matplotlib.pyplot as plt  # noqa: E402

FIXED = {"fp32": "#000000", "fp16": "#7f7f7f", "sign": "#8c564b", "topk": "#bcbd22",
         "randk": "#17becf", "absmax8": "#e377c2"}
COLOR_MAPS = {"eden": "Blues", "drive": "Purples", "quic-fl": "Oranges", "vq": "YlGn",
              "stochastic": "Reds", "qsgd": "RdPu", "dither": "Greys", "ecdq": "Greens",
              "ecdq-e8": "BuGn", "eden-mix": "PuBu", "timeshare": "GnBu",
              "correlated": "YlOrBr"}
TAB10 = plt.get_cmap("tab10")


def codec_color(label: str) -> tuple[float, float, float, float] | str:
    """The colour of a codec label such as "eden b=2" or "topk fraction=0.01"."""
    family = label.split()[0] if label.split() else label
    if family in FIXED:
        return FIXED[family]
    if family in COLOR_MAPS:
        bits = re.search(r"\bb=([\d.]+)", label)
        value = float(bits.group(1)) if bits else 1.0
        return plt.get_cmap(COLOR_MAPS[family])(min(0.95, 0.45 + 0.12 * value))
    return TAB10(zlib.crc32(family.encode()) % 10)


def codec_linestyle(label: str) -> str:
    """Dashed for biased and error-feedback variants, solid otherwise."""
    return "--" if ("biased" in label and "unbiased" not in label) or "EF" in label else "-"


def legend_outside(ax: plt.Axes, **kwargs) -> None:
    """A legend to the right of `ax`, covering no data (save with bbox_inches="tight")."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize=8, frameon=False, **kwargs)


def save(fig: plt.Figure, path) -> None:
    """Write `fig` as PNG with room for outside legends, then free it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


__all__ = ["codec_color", "codec_linestyle", "legend_outside", "plt", "save"]
