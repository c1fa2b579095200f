"""One colour per codec everywhere, and legends that cover no data."""

from __future__ import annotations

from fedquant.simulations import compare
from fedquant.simulations.plotting import codec_color, codec_linestyle, legend_outside, plt


def _labels(section: str, mode: str) -> list[str]:
    cfg = compare.load_config(None, mode)
    return [compare.label(*compare.codec_spec(s, "x")) for s in cfg[section]["codecs"]]


def test_every_codec_of_the_shipped_configs_has_its_own_style():
    for mode in ("default", "full"):
        for section in ("fl", "speed"):
            labels = _labels(section, mode)
            styles = {(str(codec_color(lab)), codec_linestyle(lab)) for lab in labels}
            assert len(styles) == len(labels), (mode, section, labels)


def test_a_codec_keeps_its_colour_and_fp32_is_black():
    assert codec_color("fp32") == "#000000"
    assert codec_color("eden b=2") == codec_color("eden b=2")
    assert codec_color("eden b=1") != codec_color("eden b=4")
    assert codec_color("eden b=2") != codec_color("quic-fl b=2")
    assert codec_linestyle("eden b=2 scale=biased") == "--"
    assert codec_linestyle("eden b=2 scale=unbiased") == "-"


def test_legend_sits_right_of_the_axes():
    fig, ax = plt.subplots()
    for i in range(12):
        ax.plot([0, 1], [i, i + 1], label=f"series {i}")
    legend_outside(ax)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1
    assert len(ax.get_legend().get_texts()) == 12
    plt.close(fig)
