"""The convolutional autoencoder, its configuration, and the params pytree that carries both.

Flax linen, not NNX: the whole library is pure functions of pytrees (the sampler calls the model thousands
of times inside one ``jit``), and a linen module's ``apply(variables, x)`` is exactly such a function, with no
``nnx.split``/``merge`` round trip per call. The weights live in :class:`AutoencoderParams`, a registered
dataclass whose configuration is static metadata, so ``attribute(params, image, labels)`` needs nothing else
and a changed configuration is a new compiled program rather than a silent mismatch.

Decoder: each upsampling step is a 3x3 convolution at the low resolution followed by depth-to-space (pixel
shuffle); on CPU, XLA's transposed convolution ran at a third of the FLOP rate of an ordinary convolution.

The convolutions are ``nn.Conv``; on CPU :mod:`shapjax.speedups` computes their kernel gradients and the output
layer differently (same values, same parameters).

The last section dispatches on the model kind (the autoencoder here, the inpainter of :mod:`shapjax.inpainting`)
for the trainer and the checkpoints: :func:`model_kind`, :func:`init_params`, :func:`make_params`,
:func:`config_from_dict`.
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

from shapjax import inpainting, speedups

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
  """

  image_shape: tuple[int, int, int]
  features: tuple[int, ...] = (32, 64, 96, 128)
  latent_features: int = 32
  bottleneck: str = "conv"

  def __post_init__(self):
    shape = tuple(int(s) for s in self.image_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
    object.__setattr__(self, "image_shape", shape)
    object.__setattr__(self, "features", tuple(int(f) for f in self.features))
    if not self.features or min(self.features) < 1:
      raise ValueError(f"features must be a non-empty tuple of positive ints, got {self.features}")
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
    """The inverse of :meth:`to_dict`; also reads checkpoints that name the (only) ``"shuffle"`` decoder."""
    data = dict(data)
    decoder = data.pop("decoder", "shuffle")
    if decoder != "shuffle":
      raise ValueError(f"decoder {decoder!r} is no longer supported: only the pixel-shuffle decoder is (a model "
                       "trained with another decoder must be retrained)")
    data["image_shape"] = tuple(data["image_shape"])
    data["features"] = tuple(data["features"])
    return cls(**data)


# nn.Conv with the CPU kernel gradients of shapjax.speedups (plain lax.conv_general_dilated elsewhere).
_Conv = functools.partial(nn.Conv, conv_general_dilated=speedups.conv_general_dilated)


class _Autoencoder(nn.Module):
  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction ``f32[N, H, W, C]`` of ``x: f32[N, H, W, C]``."""
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
    for features in outputs[:-1]:
      x = nn.relu(speedups.depth_to_space(_Conv(4 * features, (3, 3), padding="SAME")(x), 2))
    x = nn.relu(_Conv(4 * outputs[-1], (3, 3), padding="SAME")(x))
    # The output layer is nn.Conv(channels, (3, 3)) of depth_to_space(x): its own module, so that on CPU it runs
    # without the full-resolution input; named as nn.Conv would be, so the params tree is a plain conv's.
    n_convs = 2 * len(cfg.features) + (cfg.bottleneck == "conv")
    x = nn.sigmoid(speedups.ShuffleOutputConv(channels, name=f"Conv_{n_convs}")(x))
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


@functools.partial(speedups.jit_init, static_argnames=("config",))
def _init_weights(config: AutoencoderConfig, key: jax.Array) -> dict:
  # With the convolutional bottleneck the weights' shapes do not depend on the spatial size, so the smallest
  # input the strides allow is enough; its forward pass is dead code anyway.
  shape = config.image_shape if config.bottleneck == "dense" else (config.stride, config.stride,
                                                                  config.image_shape[-1])
  dummy = jnp.zeros((1, *shape), jnp.float32)
  return _module(config).init(key, dummy)["params"]


def init_autoencoder(
    image_shape: tuple[int, int, int] | None = None,
    *,
    key: jax.Array,
    config: AutoencoderConfig | None = None,
    **options,
) -> AutoencoderParams:
  """Randomly initialises an autoencoder.

  Initialisation is one jitted program (one compile, not one per PRNG op, compiled without LLVM optimisation on
  CPU), so a cold start stays short.

  Args:
    image_shape: ``(H, W, C)``; ignored when ``config`` is given.
    key: PRNG key for the weights.
    config: a full :class:`AutoencoderConfig`; otherwise one is built from ``image_shape`` and ``options``.
    **options: fields of :class:`AutoencoderConfig` (``features``, ``latent_features``, ``bottleneck``).

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


def check_params(params) -> None:
  """A TypeError that says where params come from, unless ``params`` is :class:`AutoencoderParams`."""
  if not isinstance(params, AutoencoderParams):
    raise TypeError(
        f"params must be AutoencoderParams (from init_autoencoder, train or load), got {type(params).__name__}")


def reconstruct(params: AutoencoderParams, images: ArrayLike) -> jax.Array:
  """Runs the autoencoder.

  Args:
    params: from :func:`init_autoencoder`, :func:`shapjax.train` or :func:`shapjax.load`.
    images: ``f32[N, H, W, C]`` in ``[0, 1]``.

  Returns:
    ``f32[N, H, W, C]`` reconstructions.
  """
  check_params(params)
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
  images = jnp.asarray(images, jnp.float32)
  return jnp.mean(jnp.square(reconstruct(params, images) - images), axis=(1, 2, 3))


def residual_map(params: AutoencoderParams, images: ArrayLike) -> jax.Array:
  """Per-pixel squared reconstruction error, averaged over channels: ``f32[N, H, W]``."""
  images = jnp.asarray(images, jnp.float32)
  return jnp.mean(jnp.square(reconstruct(params, images) - images), axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Model kinds: what the trainer and the checkpoints need to handle either model.

ModelConfig = AutoencoderConfig | inpainting.InpainterConfig
ModelParams = AutoencoderParams | inpainting.InpainterParams

# kind -> (config class, params class, initialiser); the kind is what checkpoints record.
_KINDS = {
    "autoencoder": (AutoencoderConfig, AutoencoderParams, init_autoencoder),
    "inpainting": (inpainting.InpainterConfig, inpainting.InpainterParams, inpainting.init_inpainter),
}
MODEL_KINDS = tuple(_KINDS)


def model_kind(config: ModelConfig) -> str:
  """``"autoencoder"`` or ``"inpainting"``: the kind of model ``config`` (or a params' config) describes."""
  config = getattr(config, "config", config)  # params -> their config
  for kind, (config_class, _, _) in _KINDS.items():
    if isinstance(config, config_class):
      return kind
  raise TypeError(f"expected an AutoencoderConfig or InpainterConfig (or their params), got {type(config).__name__}")


def config_from_dict(data: dict, *, kind: str = "autoencoder") -> ModelConfig:
  """The model config of ``kind`` from its ``to_dict()``; records without a kind are autoencoders."""
  if kind not in _KINDS:
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
  return _KINDS[kind][0].from_dict(data)


def make_params(config: ModelConfig, weights) -> ModelParams:
  """``weights`` wrapped in the params type of ``config``'s kind."""
  return _KINDS[model_kind(config)][1](weights=weights, config=config)


def init_params(config: ModelConfig, *, key: jax.Array) -> ModelParams:
  """Random params of either kind: :func:`init_autoencoder` or :func:`shapjax.init_inpainter` of ``config``."""
  return _KINDS[model_kind(config)][2](config=config, key=key)
