"""The convolutional autoencoder, its configuration, and the params pytree that carries both.

Flax linen, not NNX: the whole library is pure functions of pytrees (the sampler calls the model thousands
of times inside one ``jit``), and a linen module's ``apply(variables, x)`` is exactly such a function, with no
``nnx.split``/``merge`` round trip per call. The weights live in :class:`AutoencoderParams`, a registered
dataclass whose configuration is static metadata, so ``attribute(params, image, labels)`` needs nothing else
and a changed configuration is a new compiled program rather than a silent mismatch.

Decoder: each upsampling step is a 3x3 convolution at the low resolution followed by depth-to-space (pixel
shuffle). On CPU, XLA's transposed convolution ran several times slower per FLOP than an ordinary convolution.

The output convolution of the shuffle decoder (3x3, a few channels out, at full resolution) is the same layer
with the same weights, but computed without ever building the full-resolution input: a 2x2 convolution on the
last low-resolution tensor yields the four output phases (sub-pixel positions) at once, and the loss compares
them with the space-to-depth of the image. On CPU a full-resolution convolution with 3 output channels ran at
a tenth of the speed of the other layers, and the depth-to-space copy before it cost as much again
(``benchmarks/README.md``, log).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from shapjax import compilation

_DECODERS = ("shuffle", "resize", "transpose")
_BOTTLENECKS = ("conv", "dense")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture of the convolutional autoencoder (hashable: it is static metadata of the params).

  Attributes:
    image_shape: ``(H, W, C)`` the model is built and trained for. H and W need not be equal nor divisible
      by ``2 ** len(features)``: inputs are edge-padded up to a multiple and the output is cropped back.
    features: channels of the stride-2 encoder convolutions; the decoder mirrors them.
    latent_features: channels of the 1x1 bottleneck at the lowest resolution (``bottleneck="conv"``), or the
      length of the global code (``bottleneck="dense"``).
    bottleneck: ``"conv"``: a spatial code (each position sees only its receptive field, so reconstruction
      errors stay local); ``"dense"``: one global code for the whole image (flatten, dense, dense, reshape, as in
      Bergmann et al.'s SSIM autoencoder), so a defect anywhere changes the reconstruction everywhere. The
      dense bottleneck ties the weights to ``image_shape``.
    decoder: ``"shuffle"`` (conv then depth-to-space), ``"resize"`` (nearest upsampling then conv) or
      ``"transpose"`` (transposed convolution).
  """

  image_shape: tuple[int, int, int]
  features: tuple[int, ...] = (32, 64, 96, 128)
  latent_features: int = 32
  decoder: str = "shuffle"
  bottleneck: str = "conv"

  def __post_init__(self):
    shape = tuple(int(s) for s in self.image_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
    object.__setattr__(self, "image_shape", shape)
    object.__setattr__(self, "features", tuple(int(f) for f in self.features))
    if not self.features or min(self.features) < 1:
      raise ValueError(f"features must be a non-empty tuple of positive ints, got {self.features}")
    if self.decoder not in _DECODERS:
      raise ValueError(f"decoder must be one of {_DECODERS}, got {self.decoder!r}")
    if self.bottleneck not in _BOTTLENECKS:
      raise ValueError(f"bottleneck must be one of {_BOTTLENECKS}, got {self.bottleneck!r}")

  @classmethod
  def tiny(cls, image_shape: tuple[int, int, int] = (32, 32, 3)) -> "AutoencoderConfig":
    """A very small model for tests and smoke runs."""
    return cls(image_shape=image_shape, features=(8, 16), latent_features=8)

  @property
  def stride(self) -> int:
    """The total downsampling factor; inputs are padded to a multiple of it."""
    return 2 ** len(self.features)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict) -> "AutoencoderConfig":
    data = dict(data)
    data["image_shape"] = tuple(data["image_shape"])
    data["features"] = tuple(data["features"])
    return cls(**data)


def _depth_to_space(x: jax.Array, block: int) -> jax.Array:
  """``[N, h, w, b*b*C] -> [N, b*h, b*w, C]``; channel ``(i*b + j)*C + c`` goes to sub-pixel ``(i, j)``."""
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, block, block, c // (block * block))
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * block, w * block, c // (block * block))


def _space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """The inverse of :func:`_depth_to_space`: ``[N, b*h, b*w, C] -> [N, h, w, b*b*C]``."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // block, block, w // block, block, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // block, w // block, block * block * c)


def _corner_taps() -> np.ndarray:
  """``T[s, alpha, a, d]``: which full-resolution tap ``d - 1`` a 2x2 corner window position ``s`` holds.

  Output sub-pixel ``a`` of low-resolution row ``i`` is read from corner ``i + a``, whose 2x2 window covers
  low-resolution rows ``i + a - 1`` and ``i + a``; input sub-pixel ``alpha`` of window row ``s`` lies
  ``2 * (s - 1 + a) + alpha - a`` full-resolution rows from the output pixel.
  """
  taps = np.zeros((2, 2, 2, 3), np.float32)
  for s in range(2):
    for alpha in range(2):
      for a in range(2):
        d = 2 * s - 2 + a + alpha
        if -1 <= d <= 1:
          taps[s, alpha, a, d + 1] = 1.0
  return taps


_NHWC = ("NHWC", "HWIO", "NHWC")


# From this many output pixels per image on, kernel gradients are summed image by image (a lax.scan): one image's
# activations stay in cache, and the big layers' gradients ran 1.2-4x as fast (`benchmarks/layers.py`). A scan over
# the batch cannot be split by XLA's partitioner: a data-parallel step must differentiate each device's own images
# inside jax.shard_map (as shapjax.train(..., mesh=) does), or the activations are gathered onto every device.
_PER_IMAGE_MIN_PIXELS = 32 * 32


def _weight_grad_by_taps(x: jax.Array, dy: jax.Array, kernel_shape, strides, pads) -> jax.Array:
  """Kernel gradient of an NHWC convolution as one matrix product per tap: ``(dy^T x_shifted)^T``.

  Args:
    x: ``f32[N, H, W, C_in]`` the convolution's input.
    dy: ``f32[N, H_out, W_out, C_out]`` the gradient of its output.
    kernel_shape: ``(kh, kw, C_in, C_out)``.
    strides: ``(sh, sw)``.
    pads: ``((top, bottom), (left, right))``.

  Returns:
    ``f32[kh, kw, C_in, C_out]``.
  """
  if x.shape[0] > 1 and dy.shape[1] * dy.shape[2] >= _PER_IMAGE_MIN_PIXELS:
    def add_image(total, pair):
      return total + _weight_grad_by_taps(pair[0][None], pair[1][None], kernel_shape, strides, pads), None

    total, _ = jax.lax.scan(add_image, jnp.zeros(kernel_shape, jnp.result_type(x, dy)), (x, dy))
    return total
  kh, kw, _, _ = kernel_shape
  ho, wo = dy.shape[1:3]
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  sh, sw = strides
  taps = jnp.stack([
      jnp.einsum("nhwd,nhwc->dc", dy, x[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw])
      for a in range(kh) for b in range(kw)])  # [kh * kw, out, in]
  return taps.transpose(0, 2, 1).reshape(kernel_shape)


def _taps_are_faster(kernel_shape, strides) -> bool:  # pylint: disable=unused-argument
  # XLA:CPU computes a kernel gradient as a convolution whose window is the whole feature map; one matrix
  # product per tap ran 1.4-2.4x as fast for 8 of the 10 layers of the default model, 0.42x for the first
  # (3 input channels, so it keeps XLA's), 0.8x for the 8x8 decoder layer (0.7 ms) (`benchmarks/layers.py`). Other
  # backends keep XLA's own.
  return jax.default_backend() == "cpu" and kernel_shape[2] >= 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: tuple) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


def _conv_fwd(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: jax.lax.conv_general_dilated(x_, kernel, strides, pads, dimension_numbers=_NHWC),
                         x)
  (dx,) = input_vjp(dy)
  if _taps_are_faster(kernel.shape, strides):
    dkernel = _weight_grad_by_taps(x, dy, kernel.shape, strides, pads)
  else:
    _, kernel_vjp = jax.vjp(
        lambda k: jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=_NHWC), kernel)
    (dkernel,) = kernel_vjp(dy)
  return dx, dkernel.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None):
  """``nn.Conv``'s convolution with a faster kernel gradient on CPU (a drop-in for ``lax.conv_general_dilated``)."""
  plain = (lhs.ndim == 4 and all(d in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))
           and feature_group_count == 1 and precision is None)
  if not plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


def _Conv(features: int, kernel_size, **options) -> nn.Conv:  # pylint: disable=invalid-name
  """``nn.Conv`` (same name, parameters and initialisers) with the faster kernel gradient."""
  return nn.Conv(features, kernel_size, conv_general_dilated=_conv_general_dilated, **options)


class _PhaseOutputConv(nn.Module):
  """A 3x3 'SAME' convolution of ``depth_to_space(y)``, returned as the space-to-depth of its output.

  Same parameters (names, shapes, initialisers) as ``nn.Conv(features, (3, 3))`` applied at full resolution,
  so checkpoints and initial weights are unchanged; only the arithmetic is regrouped.

  Input ``y``: ``f32[N, h, w, 4 * C]`` (before depth-to-space). Output: ``f32[N, h, w, 4 * features]``,
  channel ``(2a + b) * features + c`` being output channel ``c`` at full-resolution pixel ``(2i + a, 2j + b)``.
  """
  features: int

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    n, h, w, channels4 = y.shape
    channels = channels4 // 4
    kernel = self.param("kernel", nn.linear.default_kernel_init, (3, 3, channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    taps = jnp.asarray(_corner_taps())
    # [s, t, (alpha, beta, cin), (a, b, cout)]: a 2x2 kernel that produces all four output phases.
    corner_kernel = jnp.einsum("sAad,tBbe,deic->stABiabc", taps, taps, kernel).reshape(
        2, 2, 4 * channels, 4 * self.features)
    corners = _conv(y, corner_kernel, (1, 1), ((1, 1), (1, 1)))  # [N, h + 1, w + 1, 4 * features]
    f = self.features
    phases = [corners[:, a:a + h, b:b + w, (2 * a + b) * f:(2 * a + b + 1) * f] for a in range(2) for b in range(2)]
    return jnp.concatenate(phases, axis=-1) + jnp.tile(bias, 4).reshape(1, 1, 1, 4 * f)


class _Autoencoder(nn.Module):
  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, phases: bool = False) -> jax.Array:
    """Reconstruction ``f32[N, H, W, C]``; with ``phases`` (shuffle decoder, even H and W) its space-to-depth
    ``f32[N, H/2, W/2, 4C]``."""
    cfg = self.config
    _, height, width, channels = x.shape
    pad_h = -height % cfg.stride
    pad_w = -width % cfg.stride
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    # Encoder: stride-2 3x3 convolutions.
    for features in cfg.features:
      x = nn.relu(_Conv(features, (3, 3), strides=2, padding="SAME")(x))
    if cfg.bottleneck == "dense":
      n, h, w, c = x.shape
      code = nn.Dense(cfg.latent_features)(x.reshape(n, h * w * c))
      x = nn.relu(nn.Dense(h * w * c)(code)).reshape(n, h, w, c)
    else:
      x = nn.relu(_Conv(cfg.latent_features, (1, 1))(x))
    # Decoder: back up to full resolution, mirroring the encoder's channels.
    outputs = list(cfg.features[-2::-1]) + [max(cfg.features[0] // 2, channels)]
    if cfg.decoder == "shuffle":
      for features in outputs[:-1]:
        x = nn.relu(_depth_to_space(_Conv(4 * features, (3, 3), padding="SAME")(x), 2))
      x = nn.relu(_Conv(4 * outputs[-1], (3, 3), padding="SAME")(x))
      # The output layer keeps nn.Conv's auto-name (Conv_<n>), so the params tree is the same as a plain conv's.
      n_convs = 2 * len(cfg.features) + (cfg.bottleneck == "conv")
      x = nn.sigmoid(_PhaseOutputConv(channels, name=f"Conv_{n_convs}")(x))
      if phases:
        if height % 2 or width % 2:
          raise ValueError(f"phases=True needs even height and width, got {height}x{width}")
        return x[:, :height // 2, :width // 2, :]
      return _depth_to_space(x, 2)[:, :height, :width, :]
    if phases:
      raise ValueError(f"phases=True needs the shuffle decoder, got decoder={cfg.decoder!r}")
    for features in outputs:
      if cfg.decoder == "resize":
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="nearest")
        x = _Conv(features, (3, 3), padding="SAME")(x)
      else:
        x = nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding="SAME")(x)
      x = nn.relu(x)
    x = nn.sigmoid(_Conv(channels, (3, 3), padding="SAME")(x))
    return x[:, :height, :width, :]


@flax.struct.dataclass
class AutoencoderParams:
  """Trained (or initialised) autoencoder: weights as pytree leaves, configuration as static metadata.

  Attributes:
    config: the :class:`AutoencoderConfig` (static: not a leaf).
    weights: the linen ``params`` collection.
  """

  weights: dict
  config: AutoencoderConfig = flax.struct.field(pytree_node=False)


def _module(config: AutoencoderConfig) -> _Autoencoder:
  return _Autoencoder(config)


def _init_program(config: AutoencoderConfig, key: jax.Array) -> dict:
  # With the convolutional bottleneck the weights' shapes do not depend on the spatial size, so the smallest
  # input the strides allow is enough; its forward pass is dead code anyway.
  shape = config.image_shape if config.bottleneck == "dense" else (config.stride, config.stride,
                                                                  config.image_shape[-1])
  dummy = jnp.zeros((1, *shape), jnp.float32)
  return _module(config).init(key, dummy)["params"]


_INIT_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.cache
def _jitted_init(unoptimised: bool):
  # Initialisation runs once and is tiny, but its PRNG kernels (threefry, erf_inv for the truncated normals) take
  # ~7 s of LLVM optimisation on CPU. Without backend optimisation it compiles in ~2 s and runs in ~0.1 s. Only a
  # top-level call on the CPU backend gets that option: other backends compile it quickly and may not know the
  # flag, and compiler options are refused on a jit nested in eval_shape or a user's jit.
  return jax.jit(_init_program, static_argnums=0, compiler_options=_INIT_OPTIONS if unoptimised else None)


def _init_exportable(key_data: jax.Array, *, config: AutoencoderConfig, key_impl: str | None) -> dict:
  """:func:`_init_program` over built-in containers only, for :func:`shapjax.compilation.call`."""
  return _init_program(config, compilation.wrap_key(key_data, key_impl))


def _init_weights(config: AutoencoderConfig, key: jax.Array) -> dict:
  top_level_on_cpu = compilation.top_level_on_cpu((key,))
  if compilation.exported_programs_enabled((key,)):
    key_data, key_impl = compilation.key_parts(key)
    return compilation.call("init_autoencoder", _init_exportable, (key_data,), dict(config=config, key_impl=key_impl),
                            compiler_options=_INIT_OPTIONS if top_level_on_cpu else None)
  return _jitted_init(top_level_on_cpu)(config, key)


def init_autoencoder(
    image_shape: tuple[int, int, int] | None = None,
    *,
    key: jax.Array,
    config: AutoencoderConfig | None = None,
    **options,
) -> AutoencoderParams:
  """Randomly initialises an autoencoder.

  Initialisation is one jitted program (one compile, not one per PRNG op, compiled without backend optimisation
  on CPU), so a cold start stays short.

  Args:
    image_shape: ``(H, W, C)``; ignored when ``config`` is given.
    key: PRNG key for the weights.
    config: a full :class:`AutoencoderConfig`; otherwise one is built from ``image_shape`` and ``options``.
    **options: fields of :class:`AutoencoderConfig` (``features``, ``latent_features``, ``decoder``).

  Returns:
    :class:`AutoencoderParams` ready for :func:`reconstruct` and :func:`shapjax.attribute`.

  Example:
    >>> import jax, shapjax
    >>> params = shapjax.init_autoencoder((32, 32, 3), key=jax.random.key(0), features=(8, 16))
    >>> params.config.image_shape
    (32, 32, 3)
  """
  if config is None:
    if image_shape is None:
      raise TypeError("init_autoencoder needs image_shape or config")
    config = AutoencoderConfig(image_shape=tuple(image_shape), **options)
  elif options:
    raise TypeError(f"give either config or options, not both (got {sorted(options)})")
  return AutoencoderParams(weights=_init_weights(config, key), config=config)


def _check_params(params) -> None:
  if not isinstance(params, AutoencoderParams):
    raise TypeError(
        f"params must be AutoencoderParams (from init_autoencoder, train or load), got {type(params).__name__}")


def host_float_images(images: np.ndarray) -> np.ndarray:
  """Host-side dtype check of an image batch (shape already checked): ``f32`` in ``[0, 1]``, finite.

  uint8 is scaled by 1/255; other integer or non-numeric dtypes are a TypeError, NaN or inf a ValueError.
  """
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f"images must be float in [0, 1] or uint8, got dtype {images.dtype}")
  images = images.astype(np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError("images contain NaN or inf")
  return images


def reconstruct(params: AutoencoderParams, images: ArrayLike) -> jax.Array:
  """Runs the autoencoder.

  Args:
    params: from :func:`init_autoencoder`, :func:`shapjax.train` or :func:`shapjax.load`.
    images: ``f32[N, H, W, C]`` in ``[0, 1]``.

  Returns:
    ``f32[N, H, W, C]`` reconstructions.
  """
  _check_params(params)
  images = jnp.asarray(images, jnp.float32)
  return _module(params.config).apply({"params": params.weights}, images)


def reconstruction_loss(params: AutoencoderParams, images: ArrayLike) -> jax.Array:
  """Mean squared reconstruction error of each image, averaged over all pixels and channels.

  Args:
    params: autoencoder params.
    images: ``f32[N, H, W, C]``.

  Returns:
    ``f32[N]``.
  """
  _check_params(params)
  images = jnp.asarray(images, jnp.float32)
  height, width = images.shape[1:3]
  if params.config.decoder == "shuffle" and height % 2 == 0 and width % 2 == 0:
    # Compared sub-pixel phase by phase: the same mean, without the full-resolution depth-to-space.
    phases = _module(params.config).apply({"params": params.weights}, images, phases=True)
    return jnp.mean(jnp.square(phases - _space_to_depth(images, 2)), axis=(1, 2, 3))
  return jnp.mean(jnp.square(reconstruct(params, images) - images), axis=(1, 2, 3))


def residual_map(params: AutoencoderParams, images: ArrayLike) -> jax.Array:
  """Per-pixel squared reconstruction error, averaged over channels: ``f32[N, H, W]``."""
  images = jnp.asarray(images, jnp.float32)
  return jnp.mean(jnp.square(reconstruct(params, images) - images), axis=-1)
