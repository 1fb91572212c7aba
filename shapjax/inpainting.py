"""The inpainting model: a small U-Net that fills hidden regions of an image from the visible rest.

Why it exists: the reconstruction-loss game of the convolutional autoencoder is additive (each region's Shapley
value is its pooled residual, ``docs/localization.md``). An inpainter turns a region's absence into a conditional
expectation (what a normal image would hold there, given the visible regions), so one region's presence changes
the prediction, and the loss, of its neighbours: the game has interactions.

Input: the visible pixels (hidden ones set to 0) and the visibility mask as one more channel, optionally a
low-resolution copy of the whole image (``context="lowres"``). Output: the predicted whole image;
:func:`inpaint` keeps the visible pixels as given and takes the hidden ones from the prediction. Training
(:func:`shapjax.train` with an :class:`InpainterConfig`) hides random square cells or Voronoi blobs of each
image (:func:`random_visible_masks`) and minimises :func:`inpainting_loss`, the squared error on the hidden
pixels (plus, if configured, SSIM and gradient-magnitude terms). Because hidden inputs are zeroed before the network sees them (and the context, when used, is the only
other path), the output does not depend on hidden pixel values with ``context="none"``.

Architecture: stride-2 3x3 convolutions down (skips kept at every resolution, the input itself included), two
3x3 convolutions at the lowest resolution, and back up by 3x3 convolution + depth-to-space, each step
concatenating the skip of its resolution and mixing it with a 3x3 convolution; a sigmoid 3x3 convolution at full
resolution gives the image (on CPU computed phase-wise at half resolution, as the autoencoder's output layer). Skips matter here, unlike in the autoencoder: the visible pixels next to a hole are
the best evidence of what it holds.
"""

from __future__ import annotations

import dataclasses
import functools

import dm_pix
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from shapjax import speedups

CONTEXTS = ("none", "lowres")


@dataclasses.dataclass(frozen=True)
class InpainterConfig:
  """Architecture of the inpainting U-Net and the holes it is trained to fill (frozen, hashable).

  Attributes:
    image_shape: ``(H, W, C)`` the model is built and trained for. H and W need not be divisible by
      ``2 ** len(features)``: inputs are edge-padded up to a multiple and the output is cropped back.
    features: channels of the stride-2 encoder convolutions; the decoder mirrors them.
    context: ``"none"``: the model sees the visible pixels and the mask only. ``"lowres"``: it also sees the
      whole image average-pooled by ``2 ** len(features)`` (nearest-neighbour upsampled), so even a small
      coalition tells it the image's overall brightness; hidden pixels then reach the output through that copy.
    cell_sizes: side lengths in pixels of the square cells that training hides (one size per image, the grid
      shifted at random).
    blob_counts: numbers of Voronoi blobs (superpixel-like regions around random seeds) an image may be split
      into for training; ``()`` trains on square cells only.
    hide_rate: ``(low, high)``: each training image draws a rate uniformly from this range and hides each cell or
      blob with that probability, so on average ``(low + high) / 2`` of the area is hidden, from nearly none to
      most of it.
    ssim_weight: weight of a structural term in the training loss: ``1 - SSIM`` of the completed image against
      the original (Wang et al. 2004; 11x11 Gaussian windows of sigma 1.5, by ``dm_pix.ssim``) on the hidden
      pixels. 0 (the default) trains on the squared error alone.
    gms_weight: weight of a gradient-magnitude term: ``1 - GMS``, the gradient magnitude similarity of Prewitt
      gradients (as in RIAD, Zavrtanik et al. 2021) between the completed and the original image, on the hidden
      pixels.
  """

  image_shape: tuple[int, int, int]
  features: tuple[int, ...] = (16, 32, 64, 128)
  context: str = "none"
  cell_sizes: tuple[int, ...] = (4, 8, 16, 32)
  blob_counts: tuple[int, ...] = (16, 32, 64)
  hide_rate: tuple[float, float] = (0.2, 0.6)
  ssim_weight: float = 0.0
  gms_weight: float = 0.0

  def __post_init__(self):
    shape = tuple(int(s) for s in self.image_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
    object.__setattr__(self, "image_shape", shape)
    for name in ("features", "cell_sizes", "blob_counts"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if not self.features or min(self.features) < 1:
      raise ValueError(f"features must be a non-empty tuple of positive ints, got {self.features}")
    if self.context not in CONTEXTS:
      raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
    if not self.cell_sizes and not self.blob_counts:
      raise ValueError("cell_sizes and blob_counts are both empty: training would hide nothing")
    if min(self.cell_sizes + self.blob_counts) < 1:
      raise ValueError(f"cell_sizes and blob_counts must be positive, got {self.cell_sizes}, {self.blob_counts}")
    rate = tuple(float(r) for r in self.hide_rate)
    if len(rate) != 2 or not 0.0 <= rate[0] <= rate[1] <= 1.0:
      raise ValueError(f"hide_rate must be (low, high) with 0 <= low <= high <= 1, got {self.hide_rate}")
    object.__setattr__(self, "hide_rate", rate)
    for name in ("ssim_weight", "gms_weight"):
      weight = float(getattr(self, name))
      if not weight >= 0.0 or weight == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
      object.__setattr__(self, name, weight)

  @classmethod
  def tiny(cls, image_shape: tuple[int, int, int] = (32, 32, 1)) -> "InpainterConfig":
    """A very small model for tests and smoke runs."""
    return cls(image_shape=image_shape, features=(8, 16), cell_sizes=(4, 8), blob_counts=(8, 16))

  @property
  def stride(self) -> int:
    """The total downsampling factor; inputs are padded to a multiple of it."""
    return 2 ** len(self.features)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict) -> "InpainterConfig":
    """The inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
    data = dict(data)
    for name in ("image_shape", "features", "cell_sizes", "blob_counts", "hide_rate"):
      if name in data:
        data[name] = tuple(data[name])
    return cls(**data)


# nn.Conv with the CPU kernel gradients of shapjax.speedups (plain lax.conv_general_dilated elsewhere).
_Conv = functools.partial(nn.Conv, conv_general_dilated=speedups.conv_general_dilated)


def _lowres(images: jax.Array, factor: int) -> jax.Array:
  """Average-pool ``f32[N, H, W, C]`` (H, W multiples of ``factor``) by ``factor``, then repeat back up."""
  n, h, w, c = images.shape
  pooled = images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
  return jnp.repeat(jnp.repeat(pooled, factor, axis=1), factor, axis=2)


class _UNet(nn.Module):
  config: InpainterConfig

  @nn.compact
  def __call__(self, images: jax.Array, visible: jax.Array) -> jax.Array:
    """Predicted image ``f32[N, H, W, C]`` from ``images: f32[N, H, W, C]`` and ``visible: f32[N, H, W]``."""
    cfg = self.config
    _, height, width, channels = images.shape
    visible = visible[..., None]
    # Hidden pixels are zeroed first, so nothing of them reaches the network but the optional context.
    x = jnp.concatenate([images * visible, visible], axis=-1)
    pads = ((0, 0), (0, -height % cfg.stride), (0, -width % cfg.stride), (0, 0))
    x = jnp.pad(x, pads, mode="edge")
    if cfg.context == "lowres":
      x = jnp.concatenate([x, _lowres(jnp.pad(images, pads, mode="edge"), cfg.stride)], axis=-1)
    skips = [x]  # the input and every encoder resolution (the lowest is where the decoder starts)
    for features in cfg.features:
      x = nn.relu(_Conv(features, (3, 3), strides=2, padding="SAME")(x))
      skips.append(x)
    for _ in range(2):
      x = nn.relu(_Conv(cfg.features[-1], (3, 3), padding="SAME")(x))

    def up(x, features):
      return nn.relu(speedups.depth_to_space(_Conv(4 * features, (3, 3), padding="SAME")(x), 2))

    for features, skip in zip(cfg.features[-2::-1], skips[-2:0:-1]):
      x = jnp.concatenate([up(x, features), skip], axis=-1)
      x = nn.relu(_Conv(features, (3, 3), padding="SAME")(x))
    # Full resolution: as in the autoencoder, the last upsampling keeps half the first layer's channels. The
    # output layer is nn.Conv(channels, (3, 3)) of concat([depth_to_space(y), input]); it runs as
    # speedups.ShuffleOutputConv on the four phases of both at half resolution (the input through
    # space_to_depth, a copy of a few channels), named as nn.Conv would be, so the params tree is a plain conv's.
    up_features = max(cfg.features[0] // 2, channels)
    y = nn.relu(_Conv(4 * up_features, (3, 3), padding="SAME")(x))
    n, h, w, _ = y.shape
    phases = jnp.concatenate([y.reshape(n, h, w, 4, up_features),
                              speedups.space_to_depth(skips[0], 2).reshape(n, h, w, 4, -1)], axis=-1)
    output = speedups.ShuffleOutputConv(channels, name=f"Conv_{3 * len(cfg.features) + 1}")
    x = nn.sigmoid(output(phases.reshape(n, h, w, -1)))
    return x[:, :height, :width, :]


@flax.struct.dataclass
class InpainterParams:
  """Trained (or initialised) inpainter: weights as pytree leaves, configuration as static metadata.

  Attributes:
    config: the :class:`InpainterConfig` (static: not a leaf).
    weights: the linen ``params`` collection.
  """

  weights: dict
  config: InpainterConfig = flax.struct.field(pytree_node=False)


@functools.partial(speedups.jit_init, static_argnames=("config",))
def _init_weights(config: InpainterConfig, key: jax.Array) -> dict:
  # The weights' shapes do not depend on the spatial size: the smallest input the strides allow is enough.
  images = jnp.zeros((1, config.stride, config.stride, config.image_shape[-1]), jnp.float32)
  visible = jnp.ones((1, config.stride, config.stride), jnp.float32)
  return _UNet(config).init(key, images, visible)["params"]


def init_inpainter(
    image_shape: tuple[int, int, int] | None = None,
    *,
    key: jax.Array,
    config: InpainterConfig | None = None,
    **options,
) -> InpainterParams:
  """Randomly initialises an inpainter.

  Args:
    image_shape: ``(H, W, C)``; ignored when ``config`` is given.
    key: PRNG key for the weights.
    config: a full :class:`InpainterConfig`; otherwise one is built from ``image_shape`` and ``options``.
    **options: fields of :class:`InpainterConfig` (``features``, ``context``, ``cell_sizes``, ...).

  Returns:
    :class:`InpainterParams` ready for :func:`inpaint` (or for :func:`shapjax.train` to start from).

  Example:
    >>> import jax, shapjax
    >>> params = shapjax.init_inpainter((32, 32, 1), key=jax.random.key(0), features=(8, 16))
    >>> params.config.image_shape
    (32, 32, 1)
  """
  if config is None:
    if image_shape is None:
      raise TypeError("init_inpainter needs image_shape or config")
    config = InpainterConfig(image_shape=tuple(image_shape), **options)
  elif options:
    raise TypeError(f"give either config or options, not both (got {sorted(options)})")
  return InpainterParams(weights=_init_weights(config, key), config=config)


def check_inpainter_params(params) -> None:
  """A TypeError that says where params come from, unless ``params`` is :class:`InpainterParams`."""
  if not isinstance(params, InpainterParams):
    raise TypeError(
        f"params must be InpainterParams (from init_inpainter, train or load), got {type(params).__name__}")


def _inputs(params, images: ArrayLike, visible_mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
  check_inpainter_params(params)
  images = jnp.asarray(images, jnp.float32)
  visible = jnp.asarray(visible_mask, jnp.float32)
  if images.ndim != 4 or visible.shape != images.shape[:3]:
    raise ValueError(f"images must be [N, H, W, C] and visible_mask [N, H, W], got shapes {images.shape} and "
                     f"{visible.shape}")
  return images, visible


def predict(params: InpainterParams, images: ArrayLike, visible_mask: ArrayLike) -> jax.Array:
  """The network's prediction of the whole image, visible pixels included: ``f32[N, H, W, C]``.

  Only the hidden pixels of the prediction are trained; :func:`inpaint` is what to use for a completed image.

  Args:
    params: from :func:`init_inpainter`, :func:`shapjax.train` or :func:`shapjax.load`.
    images: ``f32[N, H, W, C]`` in ``[0, 1]``; hidden pixels may hold anything (they are zeroed).
    visible_mask: ``bool[N, H, W]`` or ``f32[N, H, W]``, 1 where a pixel is visible.
  """
  images, visible = _inputs(params, images, visible_mask)
  return _UNet(params.config).apply({"params": params.weights}, images, visible)


def inpaint(params: InpainterParams, images: ArrayLike, visible_mask: ArrayLike) -> jax.Array:
  """Fills the hidden pixels of each image from its visible ones.

  With ``context="none"`` the result does not depend on the values of hidden pixels: they are zeroed before the
  network sees them. With ``context="lowres"`` it does, through the pooled copy of the whole image.

  Args:
    params: from :func:`init_inpainter`, :func:`shapjax.train` or :func:`shapjax.load`.
    images: ``f32[N, H, W, C]`` in ``[0, 1]``.
    visible_mask: ``bool[N, H, W]`` or ``f32[N, H, W]``, 1 where a pixel is visible (a float mask in
      ``(0, 1)`` blends input and prediction).

  Returns:
    ``f32[N, H, W, C]``: the visible pixels as given, the hidden ones predicted.

  Example:
    >>> import jax, jax.numpy as jnp, shapjax
    >>> params = shapjax.init_inpainter((16, 16, 1), key=jax.random.key(0), features=(4, 8))
    >>> images = jnp.full((1, 16, 16, 1), 0.5)
    >>> visible = jnp.arange(16)[None, None, :] < 8   # the right half hidden
    >>> shapjax.inpaint(params, images, jnp.broadcast_to(visible, (1, 16, 16))).shape
    (1, 16, 16, 1)
  """
  images, visible = _inputs(params, images, visible_mask)
  prediction = _UNet(params.config).apply({"params": params.weights}, images, visible)
  return images * visible[..., None] + prediction * (1.0 - visible[..., None])


# RIAD's constant of the gradient magnitude similarity (images in [0, 1]).
_GMS_CONSTANT = 0.0026


def ssim_map(images: ArrayLike, references: ArrayLike) -> jax.Array:
  """Per-pixel SSIM of ``f32[N, H, W, C]`` images against references, averaged over channels: ``f32[N, H, W]``.

  11x11 Gaussian windows (sigma 1.5) on images in ``[0, 1]``, edges reflected so the map has the images' size.
  """
  pads = ((0, 0), (5, 5), (5, 5), (0, 0))
  a = jnp.pad(jnp.asarray(images, jnp.float32), pads, mode="reflect")
  b = jnp.pad(jnp.asarray(references, jnp.float32), pads, mode="reflect")
  return jnp.mean(dm_pix.ssim(a, b, max_val=1.0, return_map=True), axis=-1)


def _prewitt_magnitude(images: jax.Array) -> jax.Array:
  x = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  gy = jnp.sum(jnp.stack([x[:, 2:, j:j + images.shape[2]] - x[:, :-2, j:j + images.shape[2]] for j in range(3)]),
               axis=0) / 3.0
  gx = jnp.sum(jnp.stack([x[:, i:i + images.shape[1], 2:] - x[:, i:i + images.shape[1], :-2] for i in range(3)]),
               axis=0) / 3.0
  return jnp.sqrt(jnp.square(gx) + jnp.square(gy) + 1e-12)


def gms_map(images: ArrayLike, references: ArrayLike) -> jax.Array:
  """Gradient magnitude similarity of ``f32[N, H, W, C]`` images against references: ``f32[N, H, W]`` in (0, 1].

  ``(2 g h + c) / (g^2 + h^2 + c)`` of the Prewitt gradient magnitudes ``g``, ``h`` (3x3, edges repeated),
  ``c = 0.0026``, averaged over channels; 1 where the gradients agree.
  """
  g = _prewitt_magnitude(jnp.asarray(images, jnp.float32))
  h = _prewitt_magnitude(jnp.asarray(references, jnp.float32))
  return jnp.mean((2 * g * h + _GMS_CONSTANT) / (jnp.square(g) + jnp.square(h) + _GMS_CONSTANT), axis=-1)


def inpainting_loss(params: InpainterParams, images: ArrayLike, visible_mask: ArrayLike) -> jax.Array:
  """The training objective: each image's mean loss over its hidden pixels, ``f32[N]``.

  Per hidden pixel: the squared error of the prediction (mean over channels), plus
  ``config.ssim_weight * (1 - SSIM)`` and ``config.gms_weight * (1 - GMS)`` of the completed image (visible
  pixels as given, hidden ones predicted) against the original (:func:`ssim_map`, :func:`gms_map`) when those
  weights are not 0. An image with no hidden pixel has loss 0.

  Args:
    params: inpainter params.
    images: ``f32[N, H, W, C]``.
    visible_mask: ``bool[N, H, W]`` or ``f32[N, H, W]``, 1 where visible.
  """
  images, visible = _inputs(params, images, visible_mask)
  hidden = 1.0 - visible
  prediction = _UNet(params.config).apply({"params": params.weights}, images, visible)
  error = jnp.mean(jnp.square(prediction - images), axis=-1)
  config = params.config
  if config.ssim_weight or config.gms_weight:
    completed = images * visible[..., None] + prediction * hidden[..., None]
    if config.ssim_weight:
      error = error + config.ssim_weight * (1.0 - ssim_map(completed, images))
    if config.gms_weight:
      error = error + config.gms_weight * (1.0 - gms_map(completed, images))
  return jnp.sum(error * hidden, axis=(1, 2)) / jnp.maximum(jnp.sum(hidden, axis=(1, 2)), 1.0)


def _cell_mask(key: jax.Array, height: int, width: int, cell_sizes: tuple[int, ...], rate: jax.Array) -> jax.Array:
  """``bool[H, W]`` hidden: square cells of one size drawn from ``cell_sizes``, the grid shifted at random."""
  size_key, offset_key, hide_key = jax.random.split(key, 3)
  size = jax.random.choice(size_key, jnp.asarray(cell_sizes, jnp.int32))
  offset = jax.random.randint(offset_key, (2,), 0, size)
  smallest = min(cell_sizes)
  hidden_cells = jax.random.bernoulli(hide_key, rate, (height // smallest + 2, width // smallest + 2))
  rows = (jnp.arange(height) + offset[0]) // size
  cols = (jnp.arange(width) + offset[1]) // size
  return hidden_cells[rows[:, None], cols[None, :]]


def _blob_mask(key: jax.Array, height: int, width: int, blob_counts: tuple[int, ...], rate: jax.Array) -> jax.Array:
  """``bool[H, W]`` hidden: Voronoi cells around a random number (from ``blob_counts``) of uniform seeds."""
  count_key, seed_key, hide_key = jax.random.split(key, 3)
  count = jax.random.choice(count_key, jnp.asarray(blob_counts, jnp.int32))
  most = max(blob_counts)
  seed_rows = jax.random.uniform(seed_key, (1, 1, most)) * height
  seed_cols = jax.random.uniform(jax.random.fold_in(seed_key, 1), (1, 1, most)) * width
  rows = jnp.arange(height, dtype=jnp.float32)[:, None, None] + 0.5
  cols = jnp.arange(width, dtype=jnp.float32)[None, :, None] + 0.5
  distance = jnp.square(rows - seed_rows) + jnp.square(cols - seed_cols)  # [H, W, most]
  distance = jnp.where(jnp.arange(most)[None, None, :] < count, distance, jnp.inf)
  owner = jnp.argmin(distance, axis=-1)
  return jax.random.bernoulli(hide_key, rate, (most,))[owner]


@functools.partial(jax.jit, static_argnames=("config", "n_images"))
def random_visible_masks(config: InpainterConfig, n_images: int, *, key: jax.Array) -> jax.Array:
  """The random holes training fills: ``bool[n_images, H, W]``, True where a pixel stays visible.

  Each image draws, from its own key, a hide rate from ``config.hide_rate``, then either square cells of one
  of ``config.cell_sizes`` or Voronoi blobs of one of ``config.blob_counts`` (half the images each when both are
  given), and hides each cell or blob with that rate. Traceable; the trainer draws step ``t``'s masks from
  ``fold_in(key, t)``.

  Args:
    config: the inpainter's config (image size and hole settings).
    n_images: how many masks.
    key: PRNG key.

  Example:
    >>> import jax, shapjax
    >>> config = shapjax.InpainterConfig.tiny((32, 32, 1))
    >>> masks = shapjax.random_visible_masks(config, 8, key=jax.random.key(0))
    >>> masks.shape, masks.dtype
    ((8, 32, 32), dtype('bool'))
  """
  height, width, _ = config.image_shape
  low, high = config.hide_rate

  def one(image_key):
    rate_key, kind_key, cell_key, blob_key = jax.random.split(image_key, 4)
    rate = jax.random.uniform(rate_key, minval=low, maxval=high)
    if not config.blob_counts:
      return ~_cell_mask(cell_key, height, width, config.cell_sizes, rate)
    if not config.cell_sizes:
      return ~_blob_mask(blob_key, height, width, config.blob_counts, rate)
    use_blobs = jax.random.bernoulli(kind_key)
    hidden = jnp.where(use_blobs, _blob_mask(blob_key, height, width, config.blob_counts, rate),
                       _cell_mask(cell_key, height, width, config.cell_sizes, rate))
    return ~hidden

  return jax.vmap(one)(jax.random.split(key, n_images))
