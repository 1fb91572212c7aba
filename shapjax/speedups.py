"""CPU speed-ups: the one place where shapjax computes something differently from plain JAX and Flax.

:func:`enabled` is the switch, read when a layer is traced and when a program is called: the speed-ups apply
when JAX's default backend is CPU and ``SHAPJAX_XLA_DEFAULTS`` is unset or ``0``. Otherwise every function here
is the plain one (``lax.conv_general_dilated``, ``jax.jit``), so other backends and a run with
``SHAPJAX_XLA_DEFAULTS=1`` see XLA's defaults. Each speed-up gives its gain as measured by
``benchmarks/layers.py`` (one single-threaded CPU device, 128x128x3 images, the default model, best of several
interleaved rounds on a shared 2-core machine).

* :func:`conv_general_dilated`: kernel gradients as one matrix product per tap (training).
* :class:`ShuffleOutputConv`: the output convolution without building its full-resolution input.
* :func:`jit_forward`: YNNPACK fusions of the element-wise work around each convolution (attribution).
* :func:`jit_init`: initialisation compiled without LLVM optimisation (a short cold start).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def enabled() -> bool:
  """Whether the CPU speed-ups apply: the default backend is CPU and ``SHAPJAX_XLA_DEFAULTS`` is unset or 0."""
  return os.environ.get("SHAPJAX_XLA_DEFAULTS", "") in ("", "0") and jax.default_backend() == "cpu"


def is_traced(args) -> bool:
  """Whether any leaf of ``args`` is a tracer, i.e. the call happens inside a ``jit`` (or grad, vmap, ...)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))


# --------------------------------------------------------------------------------------------------------------
# Kernel gradients of convolutions.

_NHWC = ("NHWC", "HWIO", "NHWC")


def _taps_are_faster(kernel_shape) -> bool:
  # XLA:CPU computes a kernel gradient as a convolution whose window is the whole feature map; one matrix product
  # per tap ran 1.3-18x as fast for the decoder's full-size layers (batch 8), 0.4-0.7x for the first layer (3 input
  # channels: it keeps XLA's). The small stride-2 layers come out either way (0.8-1.4x, a few ms); a step with
  # them left to XLA was not faster (batch 4: 163 ms against 132).
  return kernel_shape[2] >= 8


# From this many output pixels per image on, kernel gradients are summed image by image (a lax.scan), so that one
# image's activations stay in cache: a training step ran at 230 ms against 261 ms over the whole batch (batch 8;
# batch 4: 97 against 122 ms). A scan over the
# batch cannot be split by XLA's partitioner: a data-parallel step must differentiate each device's own images
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


def _plain_conv(x, kernel, strides, pads):
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_tap_grads(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: tuple) -> jax.Array:
  return _plain_conv(x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
  return _plain_conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _plain_conv(x_, kernel, strides, pads), x)
  (dx,) = input_vjp(dy)
  return dx, _weight_grad_by_taps(x, dy, kernel.shape, strides, pads).astype(kernel.dtype)


_conv_with_tap_grads.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None) -> jax.Array:
  """``lax.conv_general_dilated`` (a drop-in for ``nn.Conv(conv_general_dilated=...)``), with a faster kernel
  gradient on CPU for a plain NHWC convolution of 8 or more input channels.

  Same forward pass; the kernel gradient is one matrix product per tap, image by image on big feature maps. Gain:
  a training step of the default model (loss and gradient, ``benchmarks/layers.py``) ran at 150 ms against 270 ms
  with XLA's kernel gradients at batch 8 (1.8x).
  """
  use_taps = (enabled() and lhs.ndim == 4 and all(d in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))
              and feature_group_count == 1 and precision is None and _taps_are_faster(rhs.shape))
  if not use_taps:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _conv_with_tap_grads(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


# --------------------------------------------------------------------------------------------------------------
# The output convolution of the pixel-shuffle decoder.


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
  """``f32[N, h, w, b*b*C] -> f32[N, b*h, b*w, C]``; channel ``(i*b + j)*C + c`` goes to sub-pixel ``(i, j)``."""
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, block, block, c // (block * block))
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * block, w * block, c // (block * block))


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """The inverse of :func:`depth_to_space`: ``f32[N, b*h, b*w, C] -> f32[N, h, w, b*b*C]``."""
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


class ShuffleOutputConv(nn.Module):
  """``nn.Conv(features, (3, 3), padding="SAME")`` applied to ``depth_to_space(y, 2)``, with the same
  parameters (names, shapes, initialisers), so checkpoints and initial weights do not depend on how it runs.

  On CPU it never builds the full-resolution input: a 2x2 convolution of ``y`` gives the four output sub-pixels
  (phases) at once, and only the few output channels go through depth-to-space. Gain (``benchmarks/layers.py``):
  its kernel gradient (per tap) runs 11x as fast as XLA's for the full-resolution layer (76.3 -> 6.9 ms at batch
  8); forward pass and loss of the default autoencoder 53.8 -> 51.7 ms at batch 8. The inpainting U-Net's
  output layer (which also takes the full-resolution input) uses it too; docs/performance.md has its A/B.

  Input ``y``: ``f32[N, h, w, 4 * C]``. Output: ``f32[N, 2h, 2w, features]``.
  """
  features: int

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    n, h, w, channels4 = y.shape
    channels = channels4 // 4
    kernel = self.param("kernel", nn.linear.default_kernel_init, (3, 3, channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    bias = bias.reshape(1, 1, 1, self.features)
    if not enabled():
      return conv_general_dilated(depth_to_space(y, 2), kernel, (1, 1), "SAME", dimension_numbers=_NHWC) + bias
    taps = jnp.asarray(_corner_taps())
    # [s, t, (alpha, beta, cin), (a, b, cout)]: a 2x2 kernel that produces all four output phases.
    corner_kernel = jnp.einsum("sAad,tBbe,deic->stABiabc", taps, taps, kernel).reshape(
        2, 2, 4 * channels, 4 * self.features)
    corners = conv_general_dilated(y, corner_kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    f = self.features
    phases = [corners[:, a:a + h, b:b + w, (2 * a + b) * f:(2 * a + b + 1) * f] for a in range(2) for b in range(2)]
    return depth_to_space(jnp.concatenate(phases, axis=-1), 2) + bias


# --------------------------------------------------------------------------------------------------------------
# Compiler options, tried per compiled signature.


class _JitWithOptions:
  """``jax.jit(fn)`` that compiles with ``options`` where :func:`enabled` and at top level, per signature.

  An experimental option must never turn a valid call into an error: XLA:CPU's YNN fusions accept some programs
  and then refuse to run them ("Instruction with unsupported layout in YNN fusion", e.g. the kernel estimator's
  gram matrices). So each new signature (static arguments, input shapes, dtypes and shardings) is compiled with
  the options and run once, waiting for the result; if that raises, the signature is remembered and it, and every
  later call of it, runs ``jax.jit(fn)`` with XLA's defaults. A working signature is compiled once (the call
  itself compiles it) and later calls wait for nothing.
  """

  def __init__(self, fn: Callable, options: dict, static_argnames: tuple):
    self._static_argnames = tuple(static_argnames)
    parameters = list(inspect.signature(fn).parameters.values())
    self._static_positions = tuple(i for i, p in enumerate(parameters)
                                   if p.name in self._static_argnames and p.kind != p.KEYWORD_ONLY)
    self._plain = jax.jit(fn, static_argnames=self._static_argnames)
    self._tuned = jax.jit(fn, static_argnames=self._static_argnames, compiler_options=options)
    self._verified: dict = {}  # signature -> the jitted function that runs it
    self.lower = self._plain.lower
    functools.update_wrapper(self, fn)

  def _signature(self, args, kwargs):
    static = tuple(args[i] for i in self._static_positions if i < len(args))
    static += tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static_argnames))
    dynamic = ([a for i, a in enumerate(args) if i not in self._static_positions],
               {k: v for k, v in kwargs.items() if k not in self._static_argnames})
    leaves, treedef = jax.tree.flatten(dynamic)
    return static, treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)

  def __call__(self, *args, **kwargs):
    if not enabled() or is_traced((args, kwargs)):  # options are refused on a nested jit
      return self._plain(*args, **kwargs)
    signature = self._signature(args, kwargs)
    jitted = self._verified.get(signature)
    if jitted is not None:
      return jitted(*args, **kwargs)
    try:
      result = jax.block_until_ready(self._tuned(*args, **kwargs))
      self._verified[signature] = self._tuned
    except jax.errors.JaxRuntimeError:  # refused by the options (or a real error, which XLA's defaults repeat)
      self._verified[signature] = self._plain
      result = self._plain(*args, **kwargs)
    return result

  def uses_options(self, *args, **kwargs) -> bool:
    """Whether a call with these arguments runs with the options (False until its first call, inside a trace,
    off CPU, or where they failed it)."""
    return (enabled() and not is_traced((args, kwargs))
            and self._verified.get(self._signature(args, kwargs)) is self._tuned)

  def cache_size(self) -> int:
    """The number of programs compiled for this function, with the options and with XLA's defaults (a plain
    ``jax.jit`` of the same function shares JAX's cache of the latter)."""
    return self._plain._cache_size() + self._tuned._cache_size()  # pylint: disable=protected-access


def _jit_with_options(options: dict, fn: Callable | None, static_argnames: tuple):
  if fn is None:
    return functools.partial(_jit_with_options, options, static_argnames=static_argnames)
  return _JitWithOptions(fn, options, static_argnames)


# YNNPACK fusions of convolutions and of element-wise ops (XLA:CPU's default fuses the convolutions alone): the bias,
# ReLU, compositing and loss then run inside YNNPACK instead of as separate passes over each activation.
_FORWARD_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_ELTWISE"}


def jit_forward(fn: Callable | None = None, *, static_argnames: tuple = ()):
  """``jax.jit`` for a forward-only program, with YNNPACK's element-wise fusions on CPU where they work.

  Usable as ``@jit_forward`` or ``@functools.partial(jit_forward, static_argnames=...)``. Inside a user's
  ``jit``, on other backends or with ``SHAPJAX_XLA_DEFAULTS=1`` it is the plain ``jax.jit(fn)``; at top level on
  CPU each signature is compiled with the options and falls back to XLA's defaults if they fail it. ``.lower`` is
  the plain jit's (for inspecting the program); ``.cache_size()`` counts the compiled programs.

  Gain (``benchmarks/layers.py``, batch 16, one single-threaded device): forward pass and loss of the default
  autoencoder 95.8 -> 55.2 ms (1.74x), of the inpainting U-Net at 160x64x1 41.5 -> 36.4 ms (1.14x).
  """
  return _jit_with_options(_FORWARD_OPTIONS, fn, static_argnames)


# Initialisation runs once and is tiny, but its PRNG kernels (threefry, erf_inv for the truncated normals) spend
# most of their compile time in LLVM's optimisation passes.
_INIT_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_init(fn: Callable | None = None, *, static_argnames: tuple = ()):
  """``jax.jit`` for a run-once program (initialisation), compiled without LLVM optimisation on CPU.

  Same rules and calling convention as :func:`jit_forward`.

  Gain: ``init_autoencoder`` of the default model, compile and run, 5.35 -> 1.70 s (``benchmarks/layers.py``).
  """
  return _jit_with_options(_INIT_OPTIONS, fn, static_argnames)
