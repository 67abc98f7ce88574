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


def cka_heatmap(table: pa.Table, path: str | Path, title: str) -> Path:
    """Linear CKA of every pair of layers (rows of pair_stats: layer_a, layer_b, cka); diagonal = 1."""
    import numpy as np

    plt = _plt()
    d = table.to_pydict()
    layers = sorted(set(d["layer_a"]) | set(d["layer_b"]))
    idx = {l: i for i, l in enumerate(layers)}
    m = np.eye(len(layers))
    for a, b, v in zip(d["layer_a"], d["layer_b"], d["cka"]):
        m[idx[a], idx[b]] = m[idx[b], idx[a]] = v
    fig, ax = plt.subplots(figsize=(5.4, 4.6), dpi=120)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower")
    names = ["emb" if l == -1 else str(l) for l in layers]
    ax.set_xticks(range(len(layers)), names)
    ax.set_yticks(range(len(layers)), names)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_title(title)
    return _save(fig, path)


def angular_distance_plot(table: pa.Table, path: str | Path, title: str) -> Path:
    """Gromov et al.'s angular distance between consecutive layers (rows: layer_b, mean_angular),
    beside 1 - CKA: where a block changes the stream least."""
    plt = _plt()
    d = table.to_pydict()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    ax.plot(d["layer_b"], d["mean_angular"], marker="o", label="angular distance arccos(cos)/pi")
    ax.plot(d["layer_b"], [1 - c for c in d["cka"]], marker="s", label="1 - CKA")
    ax.set_xlabel("decoder block (input = previous layer)")
    ax.set_xticks(d["layer_b"])
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)  # pyplot keeps every figure until closed: a sweep draws dozens
    return path
