"""Datasets: folders in the MVTec AD layout, single image files, and a generated demo dataset.

The MVTec AD layout is::

    <root>/train/good/*                          defect-free training images
    <root>/test/good/*                           defect-free test images
    <root>/test/<defect type>/*                  defective test images
    <root>/ground_truth/<defect type>/<stem>_mask.png   0/255 mask, the size of its image

Images are read with Pillow (PNG, JPEG, BMP, TIFF; grey, 16-bit grey or RGB; any size) and resized to one size
so that they stack into one ``f32[N, H, W, C]`` array. Ground-truth masks are kept at their original size too,
for evaluation at full resolution. This module is numpy + Pillow + scikit-image only: no JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from shapjax import pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File name endings (case-insensitive) that count as images."""

_SPLITS = ("train", "test")
_GOOD = "good"
_MAX_READ_THREADS = 8


@dataclasses.dataclass(frozen=True)
class MVTecSplit:
  """One split of an MVTec-layout dataset, resized to one image size.

  Attributes:
    images: ``f32[N, H, W, C]`` in ``[0, 1]``; C is 1 when every image of the split is grey, else 3.
    masks: ``bool[N, H, W]`` ground truth resized to the image size (all False for good images).
    original_masks: ``N`` arrays ``bool[h_i, w_i]``: ground truth at each image's original size.
    defect_types: ``N`` names, ``"good"`` for defect-free images.
    paths: ``N`` image file paths.
    original_sizes: ``N`` ``(h_i, w_i)`` sizes before resizing.
  """

  images: np.ndarray
  masks: np.ndarray
  original_masks: list
  defect_types: list
  paths: list
  original_sizes: list

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def labels(self) -> np.ndarray:
    """``i32[N]``: 0 for good images, 1 for defective ones."""
    return np.asarray([t != _GOOD for t in self.defect_types], np.int32)


def _as_size(image_size) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, (int, np.integer)):
    size = (int(image_size), int(image_size))
  else:
    size = tuple(int(s) for s in image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
  return size


def _list_images(folder: Path) -> list[Path]:
  if not folder.is_dir():
    raise ValueError(f"folder not found: {folder}")
  files = sorted(p for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder: {folder}")
  return files


def _open(path: Path) -> Image.Image:
  try:
    with Image.open(path) as image:
      image.load()
      return image.copy()
  except FileNotFoundError:
    raise ValueError(f"image not found: {path}") from None
  except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
    raise ValueError(f"cannot read image {path}: {error}") from None


def _to_float(image: Image.Image, path: Path) -> np.ndarray:
  """A Pillow image as ``f32[h, w, 1]`` (grey) or ``f32[h, w, 3]`` (colour) in [0, 1]."""
  mode = image.mode
  what = f"image {path}"
  if mode in ("I;16", "I;16B", "I;16L"):
    return pixels.as_float(np.asarray(image).astype(np.uint16), what=what)[..., None]
  if mode in ("I", "F"):  # 32-bit integer or float files: scaled by their own range (8-bit, 16-bit or [0, 1])
    array = np.asarray(image, np.float64)
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{what} contains NaN or inf")
    top = array.max(initial=0)
    return pixels.as_float(np.clip(array / (65535.0 if top > 255 else 255.0 if top > 1 else 1.0), 0, 1),
                           what=what)[..., None]
  if mode in ("1", "L", "LA"):
    return pixels.as_float(np.asarray(image.convert("L")), what=what)[..., None]
  array = pixels.as_float(np.asarray(image.convert("RGB")), what=what)
  # A colour file whose channels are identical (common for JPEG scans) is grey.
  if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
    return array[..., :1]
  return array


def _resize(array: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
  """Resizes ``f32[h, w, C]`` with an antialiased bilinear filter (Pillow's, per channel)."""
  if size is None or array.shape[:2] == size:
    return array
  height, width = size
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c])).resize(
      (width, height), Image.Resampling.BILINEAR), np.float32) for c in range(array.shape[-1])]
  return np.clip(np.stack(channels, axis=-1), 0, 1)


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
  """Resizes ``bool[h, w]``: area-weighted (antialiased) then thresholded at one half."""
  if size is None or mask.shape == size:
    return mask
  return _resize(mask.astype(np.float32)[..., None], size)[..., 0] >= 0.5


def read_image(path: str | os.PathLike, *, image_size=None, channels: int | None = None) -> np.ndarray:
  """Reads one image file as float32 in ``[0, 1]``.

  Args:
    path: a PNG, JPEG, BMP or TIFF file, grey or colour.
    image_size: ``H`` or ``(H, W)`` to resize to (antialiased bilinear); ``None`` keeps the original size.
    channels: 1 or 3 to force grey or RGB (colour is averaged to grey with equal weights, grey is repeated);
      ``None`` keeps 1 for grey files and 3 for colour ones.

  Returns:
    ``f32[H, W, C]``.

  Raises:
    ValueError: naming the file, when it is missing or cannot be decoded.

  Example:
    >>> import numpy as np, tempfile, os, shapjax
    >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
    >>> from PIL import Image; Image.fromarray(np.zeros((10, 20), np.uint8)).save(path)
    >>> shapjax.read_image(path, image_size=(8, 16)).shape
    (8, 16, 1)
  """
  path = Path(path)
  array = _resize(_to_float(_open(path), path), _as_size(image_size))
  return _set_channels(array, channels)


def _set_channels(array: np.ndarray, channels: int | None) -> np.ndarray:
  if channels is None or array.shape[-1] == channels:
    return array
  if channels == 1:
    return array.mean(axis=-1, keepdims=True)
  if channels == 3:
    return np.repeat(array, 3, axis=-1)
  raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")


def _read_mask(path: Path, image_shape: tuple[int, int], image_path: Path) -> np.ndarray:
  mask = np.asarray(_open(path).convert("L")) > 127
  if mask.shape != tuple(image_shape):
    raise ValueError(f"mask {path} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} "
                     f"has size {image_shape[1]}x{image_shape[0]}")
  return mask


def _find_mask(root: Path, defect_type: str, image_path: Path) -> Path:
  folder = root / "ground_truth" / defect_type
  for name in (f"{image_path.stem}_mask.png", f"{image_path.stem}.png", f"{image_path.stem}_mask.bmp"):
    if (folder / name).is_file():
      return folder / name
  raise ValueError(f"no ground-truth mask for defective image {image_path}: expected "
                   f"{folder / (image_path.stem + '_mask.png')}")


def _read_item(root: Path, defect_type: str, path: Path, size):
  raw = _to_float(_open(path), path)
  shape = raw.shape[:2]
  if defect_type == _GOOD:
    mask = np.zeros(shape, bool)
  else:
    mask = _read_mask(_find_mask(root, defect_type, path), shape, path)
  return _resize(raw, size), mask, resize_mask(mask, size), shape


def load_mvtec(
    root: str | os.PathLike,
    *,
    split: str,
    image_size: int | tuple[int, int] | None,
    channels: int | None = None,
    max_workers: int | None = None,
) -> MVTecSplit:
  """Loads one split of a dataset in the MVTec AD folder layout.

  ``split="train"`` reads ``train/good`` only; ``split="test"`` reads ``test/good`` and every
  ``test/<defect type>`` with the masks from ``ground_truth/<defect type>/<stem>_mask.png``. Files are
  decoded by a thread pool (Pillow releases the GIL while decoding).

  Args:
    root: the dataset folder.
    split: ``"train"`` or ``"test"``.
    image_size: ``H`` or ``(H, W)`` to resize every image to (antialiased bilinear; masks are resized
      area-weighted and thresholded at one half). ``None`` keeps the original size, which then must be the same
      for all images.
    channels: 1 or 3 to force grey or RGB; by default 1 when every image is grey, else 3.
    max_workers: reader threads (default: up to 8).

  Returns:
    :class:`MVTecSplit`, images sorted by defect type (``good`` first) then file name.

  Raises:
    ValueError: naming the file or folder, for a missing or empty folder, an unreadable image, a missing
      mask of a defective image, or a mask whose size differs from its image.

  Example:
    >>> import tempfile, shapjax
    >>> root = shapjax.make_demo_dataset(tempfile.mkdtemp(), n_train=4, n_test=4, image_size=32, seed=0)
    >>> test = shapjax.load_mvtec(root, split="test", image_size=32)
    >>> test.images.shape, int(test.labels.sum())
    ((4, 32, 32, 1), 2)
  """
  root = Path(root)
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
  size = _as_size(image_size)
  if not root.is_dir():
    raise ValueError(f"dataset folder not found: {root}")
  if split == "train":
    folders = [(_GOOD, root / "train" / _GOOD)]
  else:
    test = root / "test"
    if not test.is_dir():
      raise ValueError(f"folder not found: {test}")
    types = sorted(p.name for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not types:
      raise ValueError(f"no defect-type folders in {test}")
    types.sort(key=lambda t: t != _GOOD)
    folders = [(t, test / t) for t in types]
  items = [(t, path) for t, folder in folders for path in _list_images(folder)]
  workers = max_workers or min(_MAX_READ_THREADS, (os.cpu_count() or 1) + 2)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = list(pool.map(lambda item: _read_item(root, item[0], item[1], size), items))
  shapes = {r[0].shape[:2] for r in results}
  if len(shapes) > 1:
    raise ValueError(f"images in {root} have different sizes {sorted(shapes)[:4]}...; pass image_size")
  if channels is None:
    channels = 1 if all(r[0].shape[-1] == 1 for r in results) else 3
  images = np.stack([_set_channels(r[0], channels) for r in results]).astype(np.float32)
  return MVTecSplit(
      images=images,
      masks=np.stack([r[2] for r in results]),
      original_masks=[r[1] for r in results],
      defect_types=[t for t, _ in items],
      paths=[str(p) for _, p in items],
      original_sizes=[tuple(int(s) for s in r[3]) for r in results],
  )


# --- Demo data --------------------------------------------------------------------------------------------------

DEMO_TEXTURES = ("brick", "grass", "gravel")
"""Textures bundled with scikit-image (no download) that :func:`make_demo_dataset` can crop."""


def _texture(name: str) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top  (only the demo needs it)
  if name not in DEMO_TEXTURES:
    raise ValueError(f"texture must be one of {DEMO_TEXTURES}, got {name!r}")
  return getattr(skimage.data, name)().astype(np.float32) / 255.0


def _crop(texture: np.ndarray, size: tuple[int, int], scale: float, rows: tuple[float, float],
          rng: np.random.Generator) -> np.ndarray:
  """A random crop, ``scale`` texture pixels per output pixel, from a band of the texture's rows."""
  height, width = texture.shape
  span_h, span_w = int(round(size[0] * scale)), int(round(size[1] * scale))
  top_lo, top_hi = int(rows[0] * height), int(rows[1] * height) - span_h
  top = int(rng.integers(top_lo, max(top_lo, top_hi) + 1))
  left = int(rng.integers(0, width - span_w + 1))
  patch = texture[top:top + span_h, left:left + span_w]
  return _resize(patch[..., None], size)[..., 0]


def _scratch(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """A thin line segment (1-2 px wide) across part of the image."""
  height, width = shape
  length = rng.uniform(0.35, 0.7) * min(height, width)
  angle = rng.uniform(0, np.pi)
  cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
  dy, dx = np.sin(angle), np.cos(angle)
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  along = (yy - cy) * dy + (xx - cx) * dx
  across = np.abs(-(yy - cy) * dx + (xx - cx) * dy)
  half_width = 0.5 + 0.5 * rng.integers(0, 2) + max(0.0, min(height, width) / 128 - 0.5)
  return (across <= half_width) & (np.abs(along) <= length / 2)


def _blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """A filled ellipse a few percent of the image's area."""
  height, width = shape
  ry, rx = rng.uniform(0.06, 0.14) * height, rng.uniform(0.06, 0.14) * width
  cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
  angle = rng.uniform(0, np.pi)
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
  v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
  return (u / ry) ** 2 + (v / rx) ** 2 <= 1.0


def _save_grey(array: np.ndarray, path: Path) -> None:
  Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def make_demo_dataset(
    root: str | os.PathLike,
    *,
    n_train: int,
    n_test: int,
    image_size: int | tuple[int, int],
    seed: int,
    texture: str = "brick",
    scale: float = 2.0,
) -> Path:
  """Writes a small defect dataset in the MVTec AD layout, from a texture scikit-image ships.

  Normal images are random crops of the texture (training crops come from the top 60% of its rows, test
  crops from the bottom 40%, so no test image is a training image). Half the test images (rounded down) are
  defective: a thin scratch (``test/scratch``) or a blob (``test/blob``) painted in a brightness far from the
  local texture; their masks are exactly the painted pixels. The same arguments always write the same files.

  Args:
    root: folder to write (created; existing files of the same names are overwritten).
    n_train: defect-free training images.
    n_test: test images; ``n_test // 2`` are defective.
    image_size: ``H`` or ``(H, W)``.
    seed: seed of the numpy generator that places crops and defects.
    texture: one of :data:`DEMO_TEXTURES`.
    scale: texture pixels per image pixel (the texture is 512 x 512).

  Returns:
    ``root`` as a :class:`pathlib.Path`.

  Example:
    >>> import tempfile, shapjax
    >>> root = shapjax.make_demo_dataset(tempfile.mkdtemp(), n_train=2, n_test=2, image_size=32, seed=0)
    >>> sorted(p.name for p in (root / "test").iterdir())
    ['good', 'scratch']
  """
  size = _as_size(image_size)
  if n_train < 1 or n_test < 0:
    raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
  source = _texture(texture)
  if size[0] * scale > 0.4 * source.shape[0] or size[1] * scale > source.shape[1]:
    raise ValueError(f"image_size {size} at scale {scale} does not fit in the {source.shape} texture; "
                     "lower scale or image_size")
  rng = np.random.default_rng(seed)
  root = Path(root)
  (root / "train" / _GOOD).mkdir(parents=True, exist_ok=True)
  for i in range(n_train):
    _save_grey(_crop(source, size, scale, (0.0, 0.6), rng), root / "train" / _GOOD / f"{i:03d}.png")
  n_bad = n_test // 2
  for i in range(n_test):
    image = _crop(source, size, scale, (0.6, 1.0), rng)
    if i >= n_test - n_bad:
      kind = ("blob", "scratch")[i % 2]
      mask = _scratch(size, rng) if kind == "scratch" else _blob(size, rng)
      # Paint in a brightness the texture never reaches near there (dark unless the crop already has
      # near-black pixels), so the defect is a real anomaly and not, say, one more bright mortar line.
      level = rng.uniform(0.0, 0.08) if np.percentile(image, 2) > 0.15 else rng.uniform(0.92, 1.0)
      image = np.where(mask, level, image)
      (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
      _save_grey(mask.astype(np.float32), root / "ground_truth" / kind / f"{i:03d}_mask.png")
    else:
      kind = _GOOD
    (root / "test" / kind).mkdir(parents=True, exist_ok=True)
    _save_grey(image, root / "test" / kind / f"{i:03d}.png")
  return root
