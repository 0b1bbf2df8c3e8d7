"""Draws docs/spotlight.png: what one decode step of a sparse layer reads. Run: python docs/make_diagram.py"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

BLUE, GREEN, ORANGE, GREY = "#dbe9f6", "#dff2df", "#fde5c8", "#eeeeee"
NOTE = dict(fontsize=8.5, color="#444")


def box(ax, x, y, w, h, text, fc, fs=10):
    style = "round,pad=0.04,rounding_size=0.12"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=fc, ec="#333", lw=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs)


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", lw=1.4, color="#333"))


def main(path="docs/spotlight.png"):
    fig, ax = plt.subplots(figsize=(12.4, 5.0), dpi=150)
    ax.set_xlim(0, 12.4)
    ax.set_ylim(0, 5.0)
    ax.axis("off")
    # Top row: the query's path.
    box(ax, 0.1, 3.0, 1.5, 0.9, "query q\n(post-RoPE,\none head)", BLUE)
    box(ax, 2.1, 3.0, 1.6, 0.9, "hash MLP h\n(2 layers, SiLU,\nlearned)", GREEN)
    box(ax, 4.2, 3.0, 1.7, 0.9, "sign → 128-bit\ncode(q)\n4 × uint32", GREEN)
    scan = "XNOR + popcount\nwith every cached key code,\nsummed over the query\nheads of a KV group"
    box(ax, 6.4, 2.75, 2.4, 1.5, scan, ORANGE, fs=9.5)
    box(ax, 9.3, 3.0, 1.5, 0.9, "top 2 %\n(exact, by\ncounting)", ORANGE)
    for x0, x1 in ((1.6, 2.1), (3.7, 4.2), (5.9, 6.4), (8.8, 9.3)):
        arrow(ax, x0, 3.45, x1, 3.45)
    # Bottom row: the caches and the attention.
    codes = "key-code cache\n16 B per token and KV head\n(written once per token:\ncode(k) = sign(h(k)))"
    box(ax, 4.2, 0.35, 2.3, 1.3, codes, GREY, fs=9)
    box(ax, 6.9, 0.35, 2.3, 1.3, "K / V cache\n256 B + 256 B per token\nand KV head\n(bf16, head_dim 128)", GREY, fs=9)
    attend = "exact softmax attention\nover the selected\nK / V rows only\n(gathered in the kernel)"
    box(ax, 9.8, 0.35, 2.4, 1.3, attend, BLUE, fs=9)
    arrow(ax, 5.35, 1.65, 7.0, 2.75)
    ax.text(5.55, 2.3, "reads all codes", ha="right", **NOTE)
    arrow(ax, 10.05, 3.0, 11.0, 1.65)
    ax.text(10.7, 2.35, "indices", ha="left", **NOTE)
    arrow(ax, 9.2, 1.0, 9.8, 1.0)
    ax.text(8.05, 1.78, "reads 2 % of the rows", ha="center", **NOTE)
    budget = (
        "Per decode step and sparse layer\n(layers 0 and 1 stay dense):\nbytes read = all codes (1/32 of K + V)\n"
        "+ 2 % of the K and V rows,\ninstead of all of K and V."
    )
    ax.text(0.1, 2.2, budget, fontsize=9.5, va="top")
    title = "Spotlight Attention: which cached tokens a decode step reads"
    ax.text(6.2, 4.9, title, ha="center", va="top", fontsize=12, weight="bold")
    fig.savefig(path, bbox_inches="tight", facecolor="white")


if __name__ == "__main__":
    main()
