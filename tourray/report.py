"""Plots people would rather look at than read; written as PNG files with matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_similarity_plot(table: pa.Table, path: str | Path, title: str) -> Path:
    """Mean cosine between each block's input and output, and Block Influence, by layer."""
    plt = _plt()
    d = table.to_pydict()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    ax.plot(d["layer"], d["mean_cos"], marker="o", label="cos(input, output)")
    ax.plot(d["layer"], d["block_influence"], marker="s", label="block influence = 1 - cos")
    ax.set_xlabel("decoder block")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(d["layer"])
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    ax.set_title(title)
    return _save(fig, path)


def perplexity_plot(table: pa.Table, path: str | Path, title: str) -> Path:
    """Perplexity of text tokens per category (log scale)."""
    plt = _plt()
    d = table.to_pydict()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    ax.bar(d["category"], d["perplexity"], color="#4c72b0")
    for x, y in zip(d["category"], d["perplexity"]):
        ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (text tokens)")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=15)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    fig.clear()
    return path
