"""Figures: explanations, overlay grids and loss curves (matplotlib, no pyplot state).

Figures are built on ``matplotlib.figure.Figure`` directly, so nothing here touches the global pyplot state or
needs a display; every function returns the figure and, given a ``path``, also writes a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries

_TOP_COLOURS = ("#ff3b30", "#ff9500", "#ffcc00", "#34c759", "#00c7be", "#5856d6", "#af52de", "#ff2d55")


def _show_image(ax, image: np.ndarray) -> None:
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  ax.imshow(np.clip(image, 0, 1), cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1,
            interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def _outline(ax, region: np.ndarray, colour: str, width: float = 1.5) -> None:
  if region.any():
    ax.contour(region.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width)


def _save(fig: Figure, path) -> None:
  if path is not None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")


def value_map(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Paints region values onto pixels: ``f32[H, W]`` with ``values[labels]`` (numpy twin of ``heatmap``)."""
  return np.asarray(values, np.float32)[np.asarray(labels)]


def plot_explanation(
    image: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    *,
    top_k: int = 3,
    mask: np.ndarray | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
  """Four panels: the image, its superpixels, the Shapley heat map, and the top regions outlined.

  Args:
    image: ``f32[H, W, C]`` (C in {1, 3}) or ``f32[H, W]`` in ``[0, 1]``.
    labels: ``i32[H, W]`` region ids.
    values: ``f32[R]`` Shapley value of each region (``R > max(labels)``).
    top_k: how many of the highest-valued regions to outline (in rank colours: red, orange, yellow, ...).
    mask: optional ``bool[H, W]`` ground truth, outlined in cyan on the last panel.
    title: figure title.
    path: PNG to write.

  Returns:
    The :class:`matplotlib.figure.Figure`.
  """
  labels = np.asarray(labels)
  values = np.asarray(values, np.float32)
  n_regions = int(labels.max()) + 1
  fig = Figure(figsize=(13, 3.6), dpi=100, layout="constrained")
  axes = fig.subplots(1, 4)
  _show_image(axes[0], image)
  axes[0].set_title("image")
  grey = np.asarray(image, np.float32)
  grey = grey if grey.ndim == 2 else grey.mean(axis=-1)
  boundaries = find_boundaries(labels, mode="inner")
  overlay = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
  overlay[boundaries] = (1.0, 0.85, 0.0)
  _show_image(axes[1], overlay)
  axes[1].set_title(f"{n_regions} superpixels")
  heat = value_map(values, labels)
  bound = float(np.max(np.abs(heat))) or 1.0
  shown = axes[2].imshow(heat, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
  axes[2].set_xticks([])
  axes[2].set_yticks([])
  axes[2].set_title("Shapley value per region")
  fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02, format="%.1e")
  _show_image(axes[3], image)
  order = np.argsort(-values[:n_regions])[:top_k]
  for rank, region in enumerate(order):
    _outline(axes[3], labels == region, _TOP_COLOURS[rank % len(_TOP_COLOURS)], 2.0)
  if mask is not None:
    _outline(axes[3], np.asarray(mask, bool), "#00e5ff", 1.0)
  axes[3].set_title(f"top {len(order)} regions" + (" (cyan: ground truth)" if mask is not None else ""))
  if title:
    fig.suptitle(title)
  _save(fig, path)
  return fig


def plot_overlay_grid(
    images: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    masks: np.ndarray | None = None,
    row_titles: Sequence[str] | None = None,
    alpha: float = 0.55,
    path: str | os.PathLike | None = None,
) -> Figure:
  """A grid: one row per image; columns image, ground truth (when given), then each anomaly map overlaid.

  Each map is normalised per image to its own ``[min, max]`` and drawn with ``inferno`` over the grey image.

  Args:
    images: ``f32[N, H, W, C]`` or ``f32[N, H, W]``.
    maps: column title -> ``f32[N, H, W]`` anomaly maps (Shapley heat map, residual map, ...).
    masks: optional ``bool[N, H, W]`` ground truth.
    row_titles: optional ``N`` labels (file names, defect types).
    alpha: opacity of the maps.
    path: PNG to write.

  Returns:
    The :class:`matplotlib.figure.Figure`.
  """
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  columns = 1 + (masks is not None) + len(maps)
  fig = Figure(figsize=(2.4 * columns, 2.4 * n), dpi=100, layout="constrained")
  axes = np.asarray(fig.subplots(n, columns, squeeze=False))
  for i in range(n):
    grey = images[i] if images[i].ndim == 2 else images[i].mean(axis=-1)
    _show_image(axes[i, 0], images[i])
    if row_titles is not None:
      axes[i, 0].set_ylabel(str(row_titles[i]), fontsize=8)
    column = 1
    if masks is not None:
      _show_image(axes[i, column], grey)
      axes[i, column].imshow(np.ma.masked_where(~np.asarray(masks[i], bool), np.ones_like(grey)), cmap="autumn",
                             alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
      column += 1
    for name, stack in maps.items():
      heat = np.asarray(stack[i], np.float32)
      lo, hi = float(heat.min()), float(heat.max())
      _show_image(axes[i, column], grey)
      axes[i, column].imshow((heat - lo) / (hi - lo if hi > lo else 1.0), cmap="inferno", alpha=alpha, vmin=0,
                             vmax=1, interpolation="nearest")
      if masks is not None:
        _outline(axes[i, column], np.asarray(masks[i], bool), "#00e5ff", 1.0)
      column += 1
  titles = ["image"] + (["ground truth"] if masks is not None else []) + list(maps)
  for ax, name in zip(axes[0], titles):
    ax.set_title(name, fontsize=9)
  _save(fig, path)
  return fig


def plot_loss_curve(
    losses: Sequence[float],
    path: str | os.PathLike | None = None,
    *,
    title: str = "training loss",
) -> Figure:
  """The training loss per step (log scale) with a moving average.

  Args:
    losses: loss of each step.
    path: PNG to write.
    title: axes title.

  Returns:
    The :class:`matplotlib.figure.Figure`.
  """
  losses = np.asarray(losses, np.float64)
  fig = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
  ax = fig.subplots()
  steps = np.arange(1, losses.size + 1)
  ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="per step")
  window = max(1, losses.size // 50)
  if window > 1:
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, color="#d33", linewidth=1.5, label=f"mean of {window}")
  if np.all(losses > 0):
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("mean squared reconstruction error")
  ax.set_title(title)
  ax.legend(loc="upper right")
  ax.grid(alpha=0.3)
  _save(fig, path)
  return fig
