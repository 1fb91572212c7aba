"""Figures: explanations, overlay grids and loss curves (matplotlib, no pyplot state).

Figures are built on ``matplotlib.figure.Figure`` directly, so nothing here touches the global pyplot state or
needs a display; every function returns the figure and, given a ``path``, also writes a PNG.

Conventions shared by the figures:

* every map has its own colour bar; anomaly maps are coloured from their own 1st to 99th percentile
  (:data:`ROBUST_PERCENTILES`), so a defect that covers 1% of the pixels, a thin scratch, reaches the top of
  the scale even when a few other pixels are brighter (the bar's arrows say that values beyond it are clipped);
* outlines run along pixel borders, with widths scaled to the size of an image pixel on the page, so a
  one-pixel defect stays visible inside its outline;
* the top regions are outlined in white and numbered 1..k at the region (rank 1: thicker outline, red badge);
  the ground truth is outlined in cyan one pixel outside it, leaving the defect's own pixels in view.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from jax.typing import ArrayLike
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from scipy import ndimage

from shapjax import masking, metrics

ROBUST_PERCENTILES = (1.0, 99.0)
"""Percentiles of a map's own values that span its colour scale in :func:`plot_overlay_grid`."""

_PANEL_INCHES = 2.8  # side of one image panel
_DPI = 130
_TRUTH_COLOUR = "#00e5ff"
_BOUNDARY_COLOUR = "#ffd60a"
_RANK_ONE_COLOUR = "#e8112d"
_SCALE_NOTE = ("Each map is coloured between percentiles {lo:g} and {hi:g} of its own values (its colour bar; arrows: "
               "values beyond are clipped).\nPixel AUROC depends only on how pixel values rank, not on this scale.")


def _grey(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image, np.float32)
  return image if image.ndim == 2 else image.mean(axis=-1)


def _show_image(ax, image: np.ndarray) -> None:
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  ax.imshow(np.clip(image, 0, 1), cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1,
            interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def _points_per_pixel(shape: tuple[int, ...]) -> float:
  """How many points one image pixel spans on a panel: line widths and fonts are scaled by it."""
  return _PANEL_INCHES * 72.0 / max(shape[:2])


def _edge_segments(labels: np.ndarray, *, shift: int = 0) -> np.ndarray:
  """``f32[n, 2, 2]`` segments, in ``imshow``'s pixel coordinates, along the borders where ``labels`` changes.

  Pixel ``(row, col)`` covers ``[col - 0.5, col + 0.5] x [row - 0.5, row + 0.5]``; ``shift`` is how many
  rows and columns of padding ``labels`` carries before the image's pixel ``(0, 0)``.
  """
  labels = np.asarray(labels)
  rows, cols = np.nonzero(labels[1:, :] != labels[:-1, :])  # the border under pixel (row, col)
  y, x = rows - shift + 0.5, cols - shift
  horizontal = np.stack([np.stack([x - 0.5, y], -1), np.stack([x + 0.5, y], -1)], 1)
  rows, cols = np.nonzero(labels[:, 1:] != labels[:, :-1])  # the border right of pixel (row, col)
  y, x = rows - shift, cols - shift + 0.5
  vertical = np.stack([np.stack([x, y - 0.5], -1), np.stack([x, y + 0.5], -1)], 1)
  return np.concatenate([horizontal, vertical]).astype(np.float32)


def _mask_segments(mask: np.ndarray) -> np.ndarray:
  """The outline of ``bool[H, W]`` along pixel borders, closed along the image border where it touches it."""
  return _edge_segments(np.pad(np.asarray(mask, bool), 1), shift=1)


def _draw_edges(ax, segments: np.ndarray, *, colour: str, width: float, halo: float = 0.0) -> None:
  """Draws pixel-border segments; a black ``halo`` (points each side) keeps them visible on any colour."""
  if not len(segments):
    return
  if halo:
    ax.add_collection(LineCollection(segments, colors="black", linewidths=width + 2 * halo, capstyle="projecting",
                                     zorder=3), autolim=False)
  ax.add_collection(LineCollection(segments, colors=colour, linewidths=width, capstyle="projecting", zorder=3),
                    autolim=False)


def _interior_point(region: np.ndarray) -> tuple[float, float]:
  """``(x, y)`` of the pixel deepest inside ``region`` (unlike the centroid, inside even for a crescent)."""
  depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
  row, col = np.unravel_index(np.argmax(depth), depth.shape)
  return float(col), float(row)


def _draw_truth(ax, mask: np.ndarray) -> None:
  """Outlines the ground truth one pixel outside it, so that the defect's own pixels stay in view."""
  ring = ndimage.binary_dilation(np.asarray(mask, bool), structure=np.ones((3, 3), bool))
  width = float(np.clip(0.15 * _points_per_pixel(mask.shape), 0.4, 1.0))
  _draw_edges(ax, _mask_segments(ring), colour=_TRUTH_COLOUR, width=width)


def _draw_ranked_regions(ax, labels: np.ndarray, order: Sequence[int]) -> None:
  """Outlines ``order``'s regions (rank 1 first) in white and puts a numbered badge inside each."""
  scale = _points_per_pixel(labels.shape)
  width = float(np.clip(0.45 * scale, 1.0, 1.8))
  for rank in reversed(range(len(order))):  # rank 1 drawn last, on top where outlines share a border
    line = width if rank == 0 else 0.5 * width
    _draw_edges(ax, _mask_segments(labels == order[rank]), colour="white", width=line, halo=0.4 * line)
  fontsize = float(np.clip(2.0 * scale, 6.0, 9.0))
  for rank, region in enumerate(order, start=1):
    x, y = _interior_point(labels == region)
    first = rank == 1
    ax.text(x, y, str(rank), ha="center", va="center", fontsize=fontsize * (1.2 if first else 1.0),
            fontweight="bold", color="white" if first else "black", zorder=5,
            bbox={"boxstyle": "circle,pad=0.18", "fc": _RANK_ONE_COLOUR if first else "white", "ec": "black",
                  "lw": 0.6})


def _save(fig: Figure, path) -> None:
  if path is not None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")


def plot_explanation(
    image: ArrayLike,
    labels: ArrayLike,
    values: ArrayLike,
    *,
    top_k: int = 3,
    mask: ArrayLike | None = None,
    pixel_map: ArrayLike | None = None,
    pixel_map_name: str = "pixel map",
    value_label: str = "change in reconstruction loss",
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
  """Panels: the image, its superpixels, the Shapley value map, the top regions, and optionally a pixel map.

  Given ``pixel_map``, a fifth panel follows the four: a pixel-level anomaly map. The value map has a colour bar
  (symmetric about zero: red raises the loss, blue lowers it). The ``top_k`` highest-valued regions are outlined
  in white and numbered 1..k at the region, on the map and on the image; rank 1 has the thicker outline and the
  red badge. The pixel map is coloured as in :func:`plot_overlay_grid` (``inferno``, from its own
  :data:`ROBUST_PERCENTILES`, with its colour bar) and titled ``pixel_map_name``. With a ``mask`` holding both
  defect and normal pixels, the value map's and the pixel map's pixel AUROC are written under them.

  Args:
    image: ``f32[H, W, C]`` (C in {1, 3}) or ``f32[H, W]`` in ``[0, 1]``.
    labels: ``i32[H, W]`` region ids.
    values: ``f32[R]`` Shapley value of each region (``R > max(labels)``).
    top_k: how many of the highest-valued regions to outline and number.
    mask: optional ``bool[H, W]`` ground truth, outlined in cyan on the top-regions panel and the pixel map.
    pixel_map: optional ``f32[H, W]`` pixel-level anomaly map (e.g. :func:`shapjax.evaluation.image_map`).
    pixel_map_name: the pixel map's title, e.g. its name (``"residual"``, ``"inpaint_grid"``).
    value_label: the value map's colour bar label: what a value measures in the game played.
    title: figure title.
    path: PNG to write.

  Returns:
    The :class:`matplotlib.figure.Figure`.

  Example:
    >>> import numpy as np, shapjax
    >>> labels = np.repeat(np.arange(4), 16).reshape(8, 8)
    >>> fig = shapjax.plot_explanation(np.zeros((8, 8)), labels, np.array([0.0, 3.0, 1.0, 2.0]), top_k=2,
    ...                                pixel_map=np.arange(64.0).reshape(8, 8), pixel_map_name="residual")
    >>> [text.get_text() for text in fig.axes[3].texts], fig.axes[4].get_title()
    (['1', '2'], 'residual')
  """
  labels = np.asarray(labels)
  values = np.asarray(values, np.float32)
  truth = None if mask is None else np.asarray(mask, bool)
  n_regions = int(labels.max()) + 1
  order = [int(r) for r in np.argsort(-values[:n_regions], kind="stable")[:top_k]]
  n_panels = 4 if pixel_map is None else 5
  fig = Figure(figsize=(n_panels * _PANEL_INCHES + 1.0 + 0.8 * (n_panels - 4), _PANEL_INCHES + 0.7), dpi=_DPI,
               layout="constrained")
  axes = fig.subplots(1, n_panels)
  _show_image(axes[0], image)
  axes[0].set_title("image", fontsize=10)
  _show_image(axes[1], _grey(image))
  _draw_edges(axes[1], _edge_segments(labels), colour=_BOUNDARY_COLOUR,
              width=float(np.clip(0.12 * _points_per_pixel(labels.shape), 0.35, 0.9)))
  axes[1].set_title(f"{n_regions} superpixels", fontsize=10)
  heat = np.asarray(masking.heatmap(values, labels))
  bound = float(np.max(np.abs(values[:n_regions]))) or 1.0
  shown = axes[2].imshow(heat, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
  axes[2].set_xticks([])
  axes[2].set_yticks([])
  _draw_ranked_regions(axes[2], labels, order)
  axes[2].set_title("Shapley value per region", fontsize=10)
  _label_pixel_auroc(axes[2], heat, truth)
  colorbar = fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.03)
  colorbar.set_label(value_label, fontsize=8)
  colorbar.ax.tick_params(labelsize=7)
  _show_image(axes[3], image)
  if truth is not None:
    _draw_truth(axes[3], truth)
  _draw_ranked_regions(axes[3], labels, order)
  axes[3].set_title(f"top {len(order)} regions, 1 = highest" + ("; cyan: around defect" if truth is not None else ""),
                    fontsize=9)
  if pixel_map is not None:
    _show_map(fig, axes[4], pixel_map, truth=truth)
    axes[4].set_title(pixel_map_name, fontsize=10)
  if title:
    fig.suptitle(title)
  _save(fig, path)
  return fig


def _label_pixel_auroc(ax, heat: np.ndarray, truth: np.ndarray | None) -> None:
  """Writes the map's pixel AUROC under it, where ``truth`` holds both defect and normal pixels."""
  if truth is not None and truth.any() and not truth.all():
    ax.set_xlabel(f"pixel AUROC {metrics.pixel_auroc(heat, truth):.3f}", fontsize=8)


def _show_map(fig: Figure, ax, heat: ArrayLike, *, truth: np.ndarray | None = None,
              percentiles: tuple[float, float] = ROBUST_PERCENTILES, alpha: float = 1.0,
              grey: np.ndarray | None = None):
  """An anomaly map on its own robust scale with its colour bar; with ``truth``, outlined and scored."""
  heat = np.asarray(heat, np.float32)
  lo, hi = _robust_range(heat, percentiles)
  if alpha < 1:
    _show_image(ax, grey)
  shown = ax.imshow(heat, cmap="inferno", vmin=lo, vmax=hi, alpha=alpha, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if truth is not None:
    _draw_truth(ax, truth)
    _label_pixel_auroc(ax, heat, truth)
  colorbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, extend=_clipped_ends(heat, lo, hi), ticks=[lo, hi])
  colorbar.ax.set_yticklabels([f"{lo:.2g}", f"{hi:.2g}"])
  colorbar.ax.tick_params(labelsize=7)
  return shown


def _robust_range(heat: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
  lo, hi = (float(p) for p in np.percentile(heat, percentiles))
  if hi <= lo:  # a map that is flat over most pixels: fall back to its full range
    lo, hi = float(heat.min()), float(heat.max())
  if hi <= lo:
    hi = lo + 1.0
  return lo, hi


def _clipped_ends(heat: np.ndarray, lo: float, hi: float) -> str:
  below, above = bool(heat.min() < lo), bool(heat.max() > hi)
  return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")


def plot_overlay_grid(
    images: ArrayLike,
    maps: Mapping[str, ArrayLike],
    *,
    masks: ArrayLike | None = None,
    row_titles: Sequence[str] | None = None,
    region_labels: Mapping[str, ArrayLike] | None = None,
    top_k: int = 3,
    percentiles: tuple[float, float] = ROBUST_PERCENTILES,
    alpha: float = 1.0,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
  """A grid: one row per image; columns image, ground truth (when given), then each anomaly map.

  Each map of each image is coloured (``inferno``) from its own ``percentiles`` and has its own colour bar,
  whose arrows show that values beyond are clipped: a defect covering at least ``100 - percentiles[1]`` percent
  of the pixels and scored above the rest reaches the top of the scale, however thin it is. With ``masks``, the
  ground truth is outlined in cyan on every map and each map's pixel AUROC is written under it. For the maps
  named in ``region_labels`` (maps constant on regions, such as Shapley maps), the ``top_k`` regions are
  outlined and numbered 1..k.

  Args:
    images: ``f32[N, H, W, C]`` or ``f32[N, H, W]``.
    maps: column title -> ``f32[N, H, W]`` anomaly maps (Shapley heat map, residual map, ...).
    masks: optional ``bool[N, H, W]`` ground truth.
    row_titles: optional ``N`` labels (file names, defect types).
    region_labels: column title -> ``i32[N, H, W]`` label maps of the regions to rank in that column (ranked by
      the map's mean over each region).
    top_k: regions numbered per ranked map.
    percentiles: the low and high percentile of each map that span its colour scale.
    alpha: opacity of the maps over the grey image; 1 shows the maps alone, as they are scored.
    title: figure title.
    path: PNG to write.

  Returns:
    The :class:`matplotlib.figure.Figure`.

  Raises:
    ValueError: when ``region_labels`` names a column that is not in ``maps``.

  Example:
    >>> import numpy as np, shapjax
    >>> images = np.zeros((2, 8, 8)); residuals = np.random.default_rng(0).random((2, 8, 8))
    >>> fig = shapjax.plot_overlay_grid(images, {"residual": residuals})
    >>> len(fig.axes)  # 2 rows x (image, map) + a colour bar per map
    6
  """
  images = np.asarray(images, np.float32)
  region_labels = {} if region_labels is None else dict(region_labels)
  unknown = sorted(set(region_labels) - set(maps))
  if unknown:
    raise ValueError(f"region_labels names columns {unknown} that are not in maps {sorted(maps)}")
  n = images.shape[0]
  lead = 2 if masks is not None else 1
  fig = Figure(figsize=(lead * _PANEL_INCHES + len(maps) * (_PANEL_INCHES + 0.8), n * (_PANEL_INCHES + 0.3) + 0.8),
               dpi=_DPI, layout="constrained")
  axes = np.asarray(fig.subplots(n, lead + len(maps), squeeze=False))
  for i in range(n):
    grey = _grey(images[i])
    truth = None if masks is None else np.asarray(masks[i], bool)
    _show_image(axes[i, 0], images[i])
    if row_titles is not None:
      axes[i, 0].set_ylabel(str(row_titles[i]), fontsize=9)
    if truth is not None:
      _show_image(axes[i, 1], grey)
      axes[i, 1].imshow(np.ma.masked_where(~truth, np.ones_like(grey)), cmap="autumn", alpha=0.7, vmin=0, vmax=1,
                        interpolation="nearest")
    for ax, (name, stack) in zip(axes[i, lead:], maps.items()):
      heat = np.asarray(stack[i], np.float32)
      _show_map(fig, ax, heat, truth=truth, percentiles=percentiles, alpha=alpha, grey=grey)
      if name in region_labels:
        labels = np.asarray(region_labels[name][i])
        ids = np.unique(labels)
        means = np.asarray(ndimage.mean(heat, labels, index=ids))
        _draw_ranked_regions(ax, labels, [int(r) for r in ids[np.argsort(-means, kind="stable")[:top_k]]])
  titles = ["image"] + (["ground truth"] if masks is not None else []) + list(maps)
  for ax, name in zip(axes[0], titles):
    ax.set_title(name, fontsize=10)
  fig.supxlabel(_SCALE_NOTE.format(lo=percentiles[0], hi=percentiles[1]) +
                (" White: the top regions, 1 = highest." if region_labels else "") +
                (" Cyan: one pixel around the ground truth." if masks is not None else ""), fontsize=8)
  if title:
    fig.suptitle(title)
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
