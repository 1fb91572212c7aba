"""PyTorch twins of the shapjax autoencoder, inpainter and permutation sampler, for benchmarks and cross-checks.

* :class:`TorchAutoencoder` is ``shapjax.model._Autoencoder`` in NCHW, and :func:`torch_autoencoder` copies
  the weights of an :class:`shapjax.AutoencoderParams` into it. Two details make the outputs equal, not just
  close in spirit: flax's ``"SAME"`` stride-2 convolution pads 0 before and 1 after (PyTorch's ``padding=1``
  pads 1 on both sides), and shapjax's depth-to-space splits channels as ``(row, col, channel)`` while
  ``pixel_shuffle`` splits them as ``(channel, row, col)``, so the converter permutes the output channels of
  every upsampling convolution and the fast native ``pixel_shuffle`` can be used.
* :func:`torch_permutation_shapley` does what ``shapjax.sampling.permutation_contributions`` does, hand-batched
  in PyTorch, given the same permutation ranks: size-major coalitions, chunks of ``batch_size``, no evaluation
  of coalitions that already hold every active region.
* :func:`captum_shapley` runs captum's ``ShapleyValueSampling`` on the same model, image and baseline,
  optionally with given permutations (for the agreement check).
* :class:`TorchInpainter` is ``shapjax.inpainting._UNet`` in NCHW (contexts ``"none"`` and ``"lowres"``), and
  :func:`torch_inpainter` copies the weights of an :class:`shapjax.InpainterParams` into it, with the same two
  conversions as the autoencoder's. :func:`inpainting_game` is ``shapjax.inpainted_value_fn`` of that module
  as a function of pixel visibility masks; both samplers above play it unchanged, given the image ``1`` and the
  baseline ``0`` of one channel: their composites, and captum's perturbed inputs, are then exactly the
  coalitions' visibility masks.

Nothing here is imported by the library; only ``benchmarks/`` and ``tests/test_torch_crosscheck.py`` use it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchAutoencoder(nn.Module):
  """The shapjax autoencoder (pixel-shuffle decoder, convolutional bottleneck) in PyTorch, NCHW, float32."""

  def __init__(self, config):
    super().__init__()
    if config.bottleneck != "conv":
      raise ValueError(f"no PyTorch twin for bottleneck={config.bottleneck!r}")
    self.config = config
    channels = config.image_shape[-1]
    self.encoder = nn.ModuleList()
    previous = channels
    for features in config.features:
      self.encoder.append(nn.Conv2d(previous, features, 3, stride=2, padding=0))
      previous = features
    self.bottleneck = nn.Conv2d(previous, config.latent_features, 1)
    previous = config.latent_features
    self.decoder = nn.ModuleList()
    outputs = list(config.features[-2::-1]) + [max(config.features[0] // 2, channels)]
    for features in outputs:
      self.decoder.append(nn.Conv2d(previous, 4 * features, 3, padding=1))
      previous = features
    self.head = nn.Conv2d(previous, channels, 3, padding=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """``f32[N, C, H, W] -> f32[N, C, H, W]``."""
    height, width = x.shape[-2:]
    stride = self.config.stride
    pad_h, pad_w = -height % stride, -width % stride
    if pad_h or pad_w:
      x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    for conv in self.encoder:
      x = F.relu(conv(F.pad(x, (0, 1, 0, 1))))  # flax SAME, stride 2, even size: pad (0, 1)
    x = F.relu(self.bottleneck(x))
    for conv in self.decoder:
      x = F.relu(F.pixel_shuffle(conv(x), 2))
    x = torch.sigmoid(self.head(x))
    return x[..., :height, :width]


def _conv_weights(layer: dict, *, shuffle_out: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  kernel = np.asarray(layer["kernel"], np.float32)  # [kh, kw, in, out]
  bias = np.asarray(layer["bias"], np.float32)
  if shuffle_out is not None:
    # shapjax depth-to-space reads channel (i * 2 + j) * C + c; pixel_shuffle reads c * 4 + i * 2 + j.
    order = np.arange(4 * shuffle_out).reshape(4, shuffle_out).T.reshape(-1)
    kernel, bias = kernel[..., order], bias[order]
  return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), bias


def torch_autoencoder(params, *, device: str | torch.device = "cpu") -> TorchAutoencoder:
  """A :class:`TorchAutoencoder` holding the weights of shapjax ``params`` (in eval mode, no grad needed).

  Args:
    params: :class:`shapjax.AutoencoderParams`.
    device: where the module lives.

  Returns:
    The PyTorch module; ``module(x_nchw)`` equals ``shapjax.reconstruct(params, x_nhwc)`` transposed.
  """
  config = params.config
  module = TorchAutoencoder(config)
  weights = params.weights
  n_enc = len(config.features)
  targets = list(module.encoder) + [module.bottleneck] + list(module.decoder) + [module.head]
  if sorted(weights) != sorted(f"Conv_{i}" for i in range(len(targets))):
    raise ValueError(f"expected {len(targets)} conv layers Conv_0.., got {sorted(weights)}")
  convs = [weights[f"Conv_{i}"] for i in range(len(targets))]
  with torch.no_grad():
    for index, (layer, target) in enumerate(zip(convs, targets)):
      is_up = n_enc < index <= 2 * n_enc
      kernel, bias = _conv_weights(layer, shuffle_out=target.out_channels // 4 if is_up else None)
      target.weight.copy_(torch.tensor(kernel))
      target.bias.copy_(torch.tensor(bias))
  return module.to(device).eval()


def reconstruction_loss(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
  """Mean squared reconstruction error per image: ``f32[N, C, H, W] -> f32[N]``."""
  return torch.mean(torch.square(module(images) - images), dim=(1, 2, 3))


def to_nchw(array, device="cpu") -> torch.Tensor:
  """``[..., H, W, C]`` array -> contiguous ``[..., C, H, W]`` float32 tensor."""
  tensor = torch.as_tensor(np.array(array, np.float32))
  return tensor.movedim(-1, -3).contiguous().to(device)


def torch_permutation_shapley(loss_fn, image: torch.Tensor, labels: torch.Tensor, baseline: torch.Tensor,
                              ranks: torch.Tensor, n_regions: int, *, batch_size: int = 64
                              ) -> tuple[torch.Tensor, int]:
  """Hand-batched permutation Shapley values, the same computation as shapjax's sampler.

  Args:
    loss_fn: ``f32[B, C, H, W] -> f32[B]``, e.g. ``lambda x: reconstruction_loss(module, x)``.
    image: ``f32[C, H, W]``.
    labels: ``i64[H, W]`` region ids.
    baseline: ``f32[C, H, W]``.
    ranks: ``i64[P, n_players]`` position of each player in each permutation (active players first), as
      drawn by shapjax for the same key.
    n_regions: active players (ids ``>= n_regions`` are padding and get 0).
    batch_size: composites per model call.

  Returns:
    ``(contributions f32[P, n_players], n_evals)``: per-permutation marginal contributions and the number of
    model evaluations.
  """
  n_perm, n_players = ranks.shape
  device = image.device
  with torch.no_grad():
    delta = (image - baseline)[None]
    ends = torch.stack([torch.zeros(n_players, dtype=torch.bool, device=device),
                        torch.arange(n_players, device=device) < n_regions])
    ends = ends.float()[:, labels][:, None]
    v_empty, v_full = loss_fn(baseline[None] + ends * delta)
    # Size-major: coalition f has size f // P + 1 and comes from permutation f % P.
    n_needed = max(n_regions - 1, 0) * n_perm
    values = torch.empty(n_needed, device=device)
    flat = torch.arange(n_needed, device=device)
    sizes = flat // n_perm + 1
    for begin in range(0, n_needed, batch_size):
      chunk = slice(begin, min(begin + batch_size, n_needed))
      coalitions = ranks[flat[chunk] % n_perm] < sizes[chunk, None]
      masks = coalitions.float()[:, labels][:, None]
      values[chunk] = loss_fn(baseline[None] + masks * delta)
    table = torch.full((n_players + 1, n_perm), float(v_full), device=device)
    table[0] = v_empty
    table[1:n_regions] = values.reshape(max(n_regions - 1, 0), n_perm)
    by_position = (table[1:] - table[:-1]).T
    contributions = torch.gather(by_position, 1, ranks)
    contributions[:, n_regions:] = 0.0
  return contributions, n_needed + 2


def shapjax_ranks(key, n_perm: int, max_regions: int, n_regions: int, *, estimator: str = "antithetic"
                  ) -> np.ndarray:
  """The permutation ranks ``i64[n_perm, max_regions]`` that shapjax draws for ``key`` (same code path)."""
  import jax
  import jax.numpy as jnp

  from shapjax import sampling

  @jax.jit  # one compiled program, not one per primitive: seconds less in the tests
  def draw(key, active):
    return jax.vmap(lambda i: sampling.permutation_ranks(key, i, active, estimator))(jnp.arange(n_perm))

  return np.asarray(draw(key, jnp.arange(max_regions) < n_regions), np.int64)


def permutation_orders(ranks, n_regions: int) -> list[list[int]]:
  """Permutations (player order) of the active players from shapjax ranks ``[P, n_players]``."""
  ranks = np.asarray(ranks)
  return [list(np.argsort(row)[:n_regions]) for row in ranks]


def captum_shapley(forward_fn, image: torch.Tensor, labels: torch.Tensor, baseline: torch.Tensor,
                   n_perm: int, *, perturbations_per_eval: int = 64, orders: list[list[int]] | None = None
                   ) -> tuple[torch.Tensor, int]:
  """captum ``ShapleyValueSampling`` with the regions of ``labels`` as features.

  Args:
    forward_fn: ``f32[B, C, H, W] -> f32[B]``.
    image: ``f32[C, H, W]``.
    labels: ``i64[H, W]`` consecutive region ids ``0 .. n_regions - 1``.
    baseline: ``f32[C, H, W]``.
    n_perm: permutations (captum's ``n_samples``).
    perturbations_per_eval: composites per model call.
    orders: optional given permutations (from :func:`permutation_orders`); captum draws its own otherwise.

  Returns:
    ``(values f32[n_regions], n_evals)``.
  """
  from captum.attr import ShapleyValueSampling

  sampler = ShapleyValueSampling(forward_fn)
  if orders is not None:
    sampler.permutation_generator = lambda n_features, n_samples: iter(orders[:n_samples])
  n_regions = int(labels.max()) + 1
  attributions = sampler.attribute(image[None], baselines=baseline[None], feature_mask=labels[None, None],
                                   n_samples=n_perm, perturbations_per_eval=perturbations_per_eval)
  flat_labels = labels.reshape(-1)
  first_pixel = torch.stack([torch.nonzero(flat_labels == r)[0, 0] for r in range(n_regions)])
  values = attributions[0, 0].reshape(-1)[first_pixel]
  return values, 1 + n_perm * n_regions



class TorchInpainter(nn.Module):
  """The shapjax inpainting U-Net in PyTorch, NCHW, float32 (contexts ``"none"`` and ``"lowres"``)."""

  def __init__(self, config):
    super().__init__()
    if config.context not in ("none", "lowres"):
      raise ValueError(f"no PyTorch twin for context={config.context!r}")
    self.config = config
    channels = config.image_shape[-1]
    previous = channels + 1 + (channels if config.context == "lowres" else 0)
    skip_channels = [previous]
    self.encoder = nn.ModuleList()
    for features in config.features:
      self.encoder.append(nn.Conv2d(previous, features, 3, stride=2, padding=0))
      previous = features
      skip_channels.append(features)
    self.middle = nn.ModuleList([nn.Conv2d(previous, previous, 3, padding=1) for _ in range(2)])
    self.up = nn.ModuleList()
    self.mix = nn.ModuleList()
    for features, skip in zip(config.features[-2::-1], skip_channels[-2:0:-1]):
      self.up.append(nn.Conv2d(previous, 4 * features, 3, padding=1))
      self.mix.append(nn.Conv2d(features + skip, features, 3, padding=1))
      previous = features
    last = max(config.features[0] // 2, channels)
    self.up.append(nn.Conv2d(previous, 4 * last, 3, padding=1))
    self.head = nn.Conv2d(last + skip_channels[0], channels, 3, padding=1)

  def forward(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The predicted whole image ``f32[N, C, H, W]`` from ``images: f32[N, C, H, W]``, ``visible: f32[N, H, W]``."""
    height, width = images.shape[-2:]
    stride = self.config.stride
    pad = (0, -width % stride, 0, -height % stride)
    visible = visible[:, None]
    x = torch.cat([images * visible, visible], dim=1)
    if any(pad):
      x = F.pad(x, pad, mode="replicate")
    if self.config.context == "lowres":
      padded = F.pad(images, pad, mode="replicate") if any(pad) else images
      pooled = F.avg_pool2d(padded, stride)
      x = torch.cat([x, pooled.repeat_interleave(stride, dim=2).repeat_interleave(stride, dim=3)], dim=1)
    skips = [x]
    for conv in self.encoder:
      x = F.relu(conv(F.pad(x, (0, 1, 0, 1))))  # flax SAME, stride 2, even size: pad (0, 1)
      skips.append(x)
    for conv in self.middle:
      x = F.relu(conv(x))
    for up, mix, skip in zip(self.up, self.mix, skips[-2:0:-1]):
      x = F.relu(mix(torch.cat([F.relu(F.pixel_shuffle(up(x), 2)), skip], dim=1)))
    x = torch.cat([F.relu(F.pixel_shuffle(self.up[-1](x), 2)), skips[0]], dim=1)
    x = torch.sigmoid(self.head(x))
    return x[..., :height, :width]


def torch_inpainter(params, *, device: str | torch.device = "cpu") -> TorchInpainter:
  """A :class:`TorchInpainter` holding the weights of shapjax ``params`` (in eval mode, no grad needed).

  Args:
    params: :class:`shapjax.InpainterParams`.
    device: where the module lives.

  Returns:
    The PyTorch module; ``module(x_nchw, visible)`` equals ``shapjax.inpainting.predict(params, x_nhwc,
    visible)`` transposed, and :func:`inpaint` of it equals ``shapjax.inpaint``.
  """
  config = params.config
  module = TorchInpainter(config)
  # Flax numbers the convolutions in call order: encoder, middle, then (up, mix) per level, last up, head.
  decoder = [layer for pair in zip(module.up, module.mix) for layer in pair] + [module.up[-1]]
  targets = list(module.encoder) + list(module.middle) + decoder + [module.head]
  weights = params.weights
  if sorted(weights) != sorted(f"Conv_{i}" for i in range(len(targets))):
    raise ValueError(f"expected {len(targets)} conv layers Conv_0.., got {sorted(weights)}")
  ups = {id(layer) for layer in module.up}
  with torch.no_grad():
    for index, target in enumerate(targets):
      shuffle_out = target.out_channels // 4 if id(target) in ups else None
      kernel, bias = _conv_weights(weights[f"Conv_{index}"], shuffle_out=shuffle_out)
      if tuple(kernel.shape) != tuple(target.weight.shape):
        raise ValueError(f"Conv_{index}: kernel {kernel.shape} does not fit {tuple(target.weight.shape)}")
      target.weight.copy_(torch.tensor(kernel))
      target.bias.copy_(torch.tensor(bias))
  return module.to(device).eval()


def inpaint(module: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
  """``shapjax.inpaint`` in PyTorch: visible pixels as given, hidden ones predicted, ``f32[N, C, H, W]``."""
  mask = visible[:, None]
  return images * mask + module(images, visible) * (1.0 - mask)


def inpainting_game(module: nn.Module, image: torch.Tensor):
  """``shapjax.inpainted_value_fn`` of a PyTorch inpainter, as a function of pixel visibility masks.

  ``v(S) = -(1 / (H * W)) * sum over hidden pixels of the mean over channels of (inpaint - image) ** 2``.
  Coalitions come in as masks ``f32[B, 1, H, W]`` (1 where visible), the composites that
  :func:`torch_permutation_shapley` and :func:`captum_shapley` build from the image ``ones(1, H, W)`` and the
  baseline ``zeros(1, H, W)``; see :func:`inpainting_inputs`.

  Args:
    module: e.g. :func:`torch_inpainter` (or a ``torch.compile`` of it): ``(images, visible) -> prediction``.
    image: ``f32[C, H, W]``.

  Returns:
    ``value_fn(masks: f32[B, 1, H, W]) -> f32[B]``.
  """
  height, width = image.shape[-2:]

  def value_fn(masks: torch.Tensor) -> torch.Tensor:
    visible = masks[:, 0]
    images = image[None].expand(visible.shape[0], *image.shape)
    error = torch.mean(torch.square(module(images, visible) - images), dim=1)
    # As shapjax: only hidden pixels count (inpaint() keeps visible ones, so their error is 0 there anyway).
    return -torch.sum(torch.where(visible > 0, 0.0, error), dim=(1, 2)) / (height * width)

  return value_fn


def inpainting_inputs(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """``(ones f32[1, H, W], zeros f32[1, H, W])``: the "image" and "baseline" whose composites are the masks.

  With them, ``mask * ones + (1 - mask) * zeros`` is the coalition's visibility mask, so the samplers'
  perturbation (captum's included: kept features take the input, the others the baseline) is the coalition.
  """
  ones = torch.ones((1, *image.shape[-2:]), dtype=image.dtype, device=image.device)
  return ones, torch.zeros_like(ones)
