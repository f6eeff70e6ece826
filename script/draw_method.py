"""Draw method.png: the Diagnosing & Re-learning loop. Regenerate with

    python script/draw_method.py --out method.png
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BLUE, ORANGE, GREY, GREEN, RED = "#dbe9f6", "#fde2c8", "#eeeeee", "#dff2df", "#f9d6d5"


def box(ax, x, y, w, h, text, color, size=10, bold=False):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="#444444", lw=1.0))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight="bold" if bold else "normal", wrap=True)


def arrow(ax, a, b, style="-|>", color="#333333", rad=0.0, ls="-"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, color=color, lw=1.2,
                                 connectionstyle=f"arc3,rad={rad}", linestyle=ls))


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(13, 6.2))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 6.2)
    ax.axis("off")
    ax.text(6.5, 5.95, "Diagnosing & Re-learning (D&R): each modality is re-learnt in proportion to its "
            "own train/val purity gap", ha="center", fontsize=12, fontweight="bold")

    # Training path (top)
    for i, (name, color, y) in enumerate((("audio", BLUE, 4.5), ("visual", ORANGE, 3.3))):
        box(ax, 0.2, y, 1.5, 0.8, f"{name}\ninput", color)
        box(ax, 2.2, y, 1.9, 0.8, f"encoder $\\varphi_{{{name[0]}}}$\n(ResNet-18)", color)
        box(ax, 4.6, y, 1.5, 0.8, f"pooled feature\n$z_{{{name[0]}}}$ (512-d)", color)
        arrow(ax, (1.7, y + 0.4), (2.2, y + 0.4))
        arrow(ax, (4.1, y + 0.4), (4.6, y + 0.4))
        arrow(ax, (6.1, y + 0.4), (6.7, 4.3))
    box(ax, 6.7, 3.9, 1.7, 0.8, "fusion head\n(concat) -> logits", GREY)
    arrow(ax, (8.4, 4.3), (9.0, 4.3))
    box(ax, 9.0, 3.9, 1.9, 0.8, "cross-entropy\n(no extra loss)", GREY)
    ax.text(0.2, 5.45, "1. train jointly; snapshot $\\theta_{init}$ of every encoder before the first step",
            fontsize=10)

    # Diagnosis (bottom)
    ax.text(0.2, 0.5, "2. diagnose every reinit_epoch epochs (at most reinit_num times), per modality k:",
            fontsize=10)
    box(ax, 0.2, 0.9, 2.6, 1.3, "features of encoder k on\ntrain split D and val split V\n(eval mode, no grad)",
        GREEN, size=9)
    box(ax, 3.2, 0.9, 2.6, 1.3, "scale each matrix to [-1, 1]\nper dimension; k-means,\nk = number of classes",
        GREEN, size=9)
    box(ax, 6.2, 0.9, 2.2, 1.3, "purity $P_k(D)$, $P_k(V)$\ngap\n$g_k = |P_k(D) - P_k(V)|$", GREEN, size=9)
    box(ax, 8.8, 0.9, 1.7, 1.3, "strength\n$a_k = \\tanh(\\lambda g_k)$", RED, size=9)
    box(ax, 10.9, 0.9, 1.95, 1.3, "3. soft re-init\n$\\theta_k \\leftarrow a_k \\theta_k^{init}$\n"
        "$+ (1 - a_k) \\theta_k$", RED, size=9)
    for a, b in (((2.8, 1.55), (3.2, 1.55)), ((5.8, 1.55), (6.2, 1.55)), ((8.4, 1.55), (8.8, 1.55)),
                 ((10.5, 1.55), (10.9, 1.55))):
        arrow(ax, a, b)
    arrow(ax, (5.35, 3.3), (5.35, 2.95), style="-", ls="--")
    arrow(ax, (5.35, 2.95), (1.5, 2.2), ls="--")
    # re-init acts back on the encoders: up from the box, left under the features, up into phi
    ax.plot([11.9, 11.9, 3.15], [2.2, 2.95, 2.95], color="#b03a2e", lw=1.2)
    arrow(ax, (3.15, 2.95), (3.15, 3.28), color="#b03a2e")
    ax.text(9.3, 3.2, "large gap (memorised or noise-fitted) -> pulled back towards init;\n"
            "small gap (still learning) -> left almost as is", fontsize=9, color="#b03a2e", ha="center")
    fig.savefig(out, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "method.png"),
                   help="output PNG (default: method.png at the repository root)")
    draw(Path(p.parse_args().out))
