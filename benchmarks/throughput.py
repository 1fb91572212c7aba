"""shapjax against PyTorch on the same autoencoder, weights, image, regions and baseline.

    .venv/bin/python benchmarks/throughput.py              # full run (~15-25 min on 2 CPU cores)
    .venv/bin/python benchmarks/throughput.py --quick      # smaller sizes, fewer rounds (~5 min)

Every method runs once per round, the rounds interleave the methods (a shared machine drifts by tens of
percent over minutes: only ratios from one run mean anything), the first call of each method is reported as
its compile/warm-up time and the median of the other rounds as its steady-state time, always after
``block_until_ready`` (JAX) or on finished tensors (PyTorch). Sections:

* ceiling: the fastest float32 matrix product of numpy, JAX and PyTorch, timed as extra methods inside the
  rounds of every section, so the share of the ceiling compares like with like on a drifting machine;
* forward: one autoencoder batch, JAX jit vs PyTorch eager vs torch.compile;
* attribution: (a) ``shapjax.attribute``, (b) the hand-batched PyTorch permutation sampler, eager and with a
  torch.compile'd model, (c) captum ShapleyValueSampling (eager and torch.compile) at several
  ``perturbations_per_eval``; evaluations/s, ratios to shapjax, useful GFLOP/s and share of the ceiling;
* agreement: every sampler on the same permutations gives the same Shapley values;
* inpainting: the same comparison (shapjax, hand-batched sampler eager and torch.compile, captum eager and
  torch.compile) for the inpainting game of the inpainting U-Net (``--inpaint-shape``, default a 160x64 grey
  image, ``--inpaint-regions``), with its agreement check and the bars shapjax must clear (PASS / FAIL);
* train: steps/s of forward + backward + Adam, optax vs PyTorch eager and torch.compile;
* memory: peak RSS of ``attribute`` with a small and a large ``n_perm``, each in a fresh process;
* cold start: a new process to its first ``attribute`` result, without and with a persistent compilation cache.

Runs unchanged on a GPU: JAX uses its default backend, PyTorch uses CUDA when it is available.
Writes JSON (``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------------------------------------
# Child processes (memory, cold start): keep them import-light and self-contained.

def _child_rss(args) -> None:
  """Runs one attribute() and prints JSON with peak RSS (resource.getrusage, so this process only)."""
  import resource

  import jax
  import numpy as np

  import shapjax

  size, n_perm, max_regions = args.size, args.child_n_perm, args.regions
  params = shapjax.init_autoencoder((size, size, 3), key=jax.random.key(0))
  image = _make_image(size)
  labels = _make_labels(image, max_regions)
  from shapjax import attribution, sampling

  # What XLA plans to allocate for the program (temporaries), before anything runs.
  prepared = attribution.prepare(params, image, labels, n_perm, max_regions=max_regions,
                                 batch_size=sampling.default_batch_size(args.batch_size))
  compiled = jax.jit(lambda *args: attribution.run_images(params, *args, offset=0, baseline_array=None,
                                                           options=prepared.options)).lower(
      prepared.images[None], prepared.labels[None], jax.random.key(1)).compile()
  analysis = compiled.memory_analysis()
  temp_mib = getattr(analysis, "temp_size_in_bytes", float("nan")) / 2 ** 20 if analysis else float("nan")
  if args.child_compile_only:
    print(json.dumps({"n_perm": n_perm, "xla_temp_mib": temp_mib}))
    return
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  result = shapjax.attribute(params, image, labels, n_perm, key=jax.random.key(1), max_regions=max_regions,
                             batch_size=args.batch_size)
  jax.block_until_ready(result)
  seconds = time.perf_counter() - start
  print(json.dumps({"n_perm": n_perm, "n_evals": int(result.n_evals), "seconds": seconds, "xla_temp_mib": temp_mib,
                    "peak_rss_mib_before_attribute": rss_before / 1024,
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "values_finite": bool(np.all(np.isfinite(np.asarray(result.values))))}))


def _child_cold(args) -> None:
  """A new process to its first attribute() result; prints JSON with the time of each step."""
  marks = {}
  start = float(args.child_start)
  import jax

  import shapjax

  if args.child_cache:  # the opt-in: XLA's persistent cache and shapjax's exported (traced) programs
    shapjax.enable_compilation_cache(args.child_cache)

  marks["import"] = time.time() - start
  params = shapjax.init_autoencoder((args.size, args.size, 3), key=jax.random.key(0))
  jax.block_until_ready(params)
  marks["init"] = time.time() - start
  image = _make_image(args.size)
  labels = _make_labels(image, args.regions)
  marks["segment"] = time.time() - start
  result = shapjax.attribute(params, image, labels, args.child_n_perm, key=jax.random.key(1),
                             max_regions=args.regions, batch_size=args.batch_size)
  jax.block_until_ready(result)
  marks["first_result"] = time.time() - start
  image2 = _make_image(args.size, seed=7)
  labels2 = _make_labels(image2, args.regions)
  t0 = time.time()
  jax.block_until_ready(shapjax.attribute(params, image2, labels2, args.child_n_perm, key=jax.random.key(1),
                                          max_regions=args.regions, batch_size=args.batch_size))
  marks["second_image_seconds"] = time.time() - t0
  print(json.dumps(marks))


# ----------------------------------------------------------------------------------------------------------
# Shared inputs.

def _make_image(size: int, seed: int = 0, *, shape: tuple[int, int, int] | None = None):
  """A textured 'normal' image with a small bright scratch: deterministic, no data files needed.

  ``f32[size, size, 3]``, or ``f32[H, W, C]`` for ``shape=(H, W, C)``.
  """
  import numpy as np
  from scipy import ndimage

  height, width, channels = shape or (size, size, 3)
  rng = np.random.default_rng(seed)
  noise = ndimage.gaussian_filter(rng.random((height, width, channels)), sigma=(3, 3, 0))
  image = (noise - noise.min()) / (np.ptp(noise) + 1e-9)
  image[height // 3:height // 3 + 3, width // 4:width // 2] = 1.0
  return image.astype(np.float32)


def _make_labels(image, max_regions: int):
  import shapjax

  return shapjax.segment(image, max_regions=max_regions)


# ----------------------------------------------------------------------------------------------------------
# Timing helpers.

class _Method:
  """A named zero-argument callable plus its work count; records the first call and the steady rounds."""

  def __init__(self, name, fn, *, n_evals, kind):
    self.name, self.fn, self.n_evals, self.kind = name, fn, n_evals, kind
    self.first = None
    self.times = []

  def run(self):
    start = time.perf_counter()
    self.fn()
    seconds = time.perf_counter() - start
    if self.first is None:
      self.first = seconds
    else:
      self.times.append(seconds)

  @property
  def steady(self):
    return statistics.median(self.times) if self.times else float("nan")


def _interleave(methods, rounds):
  for method in methods:  # first call: compile / warm-up
    method.run()
  for _ in range(rounds):
    for method in methods:
      method.run()


def _jax_sync(fn):
  import jax

  return lambda: jax.block_until_ready(fn())


def _torch_sync(fn, device):
  import torch

  def run():
    out = fn()
    if device.type == "cuda":
      torch.cuda.synchronize()
    return out

  return run


# ----------------------------------------------------------------------------------------------------------
# Sections.

def matmul_methods(size: int) -> list:
  """float32 size x size matrix products in numpy, JAX and PyTorch, as methods to interleave with others."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  rng = np.random.default_rng(0)
  a = rng.random((size, size), dtype=np.float32)
  b = rng.random((size, size), dtype=np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  jmm = jax.jit(jnp.matmul)
  ta, tb = torch.as_tensor(a, device=device), torch.as_tensor(b, device=device)
  flops = 2.0 * size ** 3
  return [
      _Method("matmul numpy", lambda: a @ b, n_evals=flops, kind="matmul"),
      _Method("matmul jax", _jax_sync(lambda: jmm(ja, jb)), n_evals=flops, kind="matmul"),
      _Method("matmul torch", _torch_sync(lambda: ta @ tb, device), n_evals=flops, kind="matmul"),
  ]


def ceiling_of(methods) -> dict:
  """GFLOP/s of each matrix product (its fastest round) and the best of them: the ceiling."""
  # Median rounds, like the methods it is compared with.
  result = {m.name.split()[-1]: m.n_evals / m.steady / 1e9 for m in methods if m.kind == "matmul"}
  result["ceiling"] = max(result.values())
  return result


def model_flops(config) -> float:
  """Multiply-adds x 2 of one forward pass of the shapjax autoencoder (no zeros of transposed convs)."""
  height, width, channels = config.image_shape
  stride = config.stride
  h = -(-height // stride) * stride
  w = -(-width // stride) * stride
  flops = 0.0
  previous = channels
  for features in config.features:
    h, w = h // 2, w // 2
    flops += 2 * h * w * 9 * previous * features
    previous = features
  flops += 2 * h * w * previous * config.latent_features
  previous = config.latent_features
  outputs = list(config.features[-2::-1]) + [max(config.features[0] // 2, channels)]
  for features in outputs:
    flops += 2 * h * w * 9 * previous * 4 * features  # conv at low resolution, then depth-to-space
    h, w = 2 * h, 2 * w
    previous = features
  flops += 2 * h * w * 9 * previous * channels
  return flops


def inpainter_flops(config) -> float:
  """Multiply-adds x 2 of one forward pass of the shapjax inpainting U-Net (convolutions only)."""
  height, width, channels = config.image_shape
  stride = config.stride
  h = -(-height // stride) * stride
  w = -(-width // stride) * stride
  previous = channels + 1 + (channels if config.context == "lowres" else 0)
  skips = [previous]
  flops = 0.0
  for features in config.features:
    h, w = h // 2, w // 2
    flops += 2 * h * w * 9 * previous * features
    previous = features
    skips.append(features)
  flops += 2 * (2 * h * w * 9 * previous * previous)
  for features, skip in zip(config.features[-2::-1], skips[-2:0:-1]):
    flops += 2 * h * w * 9 * previous * 4 * features  # conv at low resolution, then depth-to-space
    h, w = 2 * h, 2 * w
    flops += 2 * h * w * 9 * (features + skip) * features
    previous = features
  last = max(config.features[0] // 2, channels)
  flops += 2 * h * w * 9 * previous * 4 * last
  h, w = 2 * h, 2 * w
  flops += 2 * h * w * 9 * (last + skips[0]) * channels
  return flops


def forward_section(args, params, module, compiled, image, batch, rounds, device) -> list:
  import jax
  import jax.numpy as jnp
  import torch

  import shapjax
  from benchmarks import torch_reference

  images = jnp.broadcast_to(jnp.asarray(image)[None], (batch, *image.shape)) + 0.0
  timages = torch_reference.to_nchw(image, device)[None].repeat(batch, 1, 1, 1)
  loss = jax.jit(shapjax.reconstruction_loss)

  def torch_loss(net):
    def run():
      with torch.no_grad():
        return torch_reference.reconstruction_loss(net, timages)
    return _torch_sync(run, device)

  methods = [
      _Method("jax jit", _jax_sync(lambda: loss(params, images)), n_evals=batch, kind="forward"),
      _Method("torch eager", torch_loss(module), n_evals=batch, kind="forward"),
      _Method("torch.compile", torch_loss(compiled), n_evals=batch, kind="forward"),
  ] + matmul_methods(args.matmul_size)
  _interleave(methods, rounds)
  return methods


def _torch_players(labels, key, n_perm: int, max_regions: int, n_regions: int, device):
  """The regions and shapjax's permutations (``key``) for the PyTorch samplers: ``(t_labels, t_ranks, orders)``."""
  import numpy as np
  import torch

  from benchmarks import torch_reference

  t_labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
  ranks = torch_reference.shapjax_ranks(key, n_perm, max_regions, n_regions)
  return (t_labels, torch.as_tensor(ranks, device=device),
          torch_reference.permutation_orders(ranks, n_regions))


def _time_samplers(args, run_shapjax, module, compiled, run_torch, run_captum, device, orders, n_perm: int,
                   n_regions: int):
  """Times shapjax (one device, and a mesh of every device when there are several) against the PyTorch samplers
  and captum in interleaved rounds, then checks their agreement on the same permutations.

  ``run_shapjax(batch_size=..., mesh=None)`` runs ``shapjax.attribute``; the others are as in
  :func:`_pytorch_methods`. Returns ``(methods, agreement)``.
  """
  import jax

  import shapjax
  from shapjax import sampling

  n_evals_shapjax = n_perm * (n_regions - 1) + 2
  n_evals_captum = 1 + n_perm * n_regions
  methods = [_Method(f"shapjax attribute (1 device, batch {args.batch_size})", _jax_sync(run_shapjax),
                     n_evals=n_evals_shapjax, kind="attribution")]
  run_sharded = None  # no mesh
  n_devices = jax.device_count()
  if n_devices > 1:  # e.g. --cpu-devices: the permutations split across devices, each on its own core(s)
    mesh = shapjax.make_mesh()
    sharded_batch_size = sampling.default_batch_size(args.sharded_batch_size)

    def run_sharded():  # pylint: disable=function-redefined
      return run_shapjax(batch_size=sharded_batch_size, mesh=mesh)

    methods.insert(0, _Method(f"shapjax attribute, mesh of {n_devices} devices (batch {sharded_batch_size})",
                              _jax_sync(run_sharded), n_evals=n_evals_shapjax, kind="attribution"))
  methods += _pytorch_methods(args, module, compiled, run_torch, run_captum, device,
                              n_evals_torch=n_evals_shapjax, n_evals_captum=n_evals_captum)
  methods += matmul_methods(args.matmul_size)
  _interleave(methods, args.rounds)
  # Agreement on the same permutations, after the timings so that their first calls are the compiling ones.
  agreement = _agreement(args, run_shapjax, run_sharded, run_torch, run_captum, module, compiled, orders, n_regions)
  return methods, agreement


def _pytorch_methods(args, module, compiled, run_torch, run_captum, device, *, n_evals_torch: int,
                     n_evals_captum: int) -> list:
  """The hand-batched PyTorch sampler at every ``--torch-batch-sizes`` and captum at every ``--captum-ppe``, each
  eager and with the torch.compile'd model."""
  methods = []
  for bs in args.torch_batch_sizes:
    for label, net in (("eager", module), ("compile", compiled)):
      methods.append(_Method(f"torch sampler {label} (batch {bs})",
                             _torch_sync(lambda bs=bs, net=net: run_torch(net, bs), device),
                             n_evals=n_evals_torch, kind="attribution"))
  for ppe in args.captum_ppe:
    for label, net in (("eager", module), ("compile", compiled)):
      methods.append(_Method(f"captum {label} (ppe {ppe})",
                             _torch_sync(lambda ppe=ppe, net=net: run_captum(net, ppe), device),
                             n_evals=n_evals_captum, kind="attribution"))
  return methods


def _agreement(args, run_shapjax, run_sharded, run_torch, run_captum, module, compiled, orders,
               n_regions: int) -> dict:
  """Largest difference of each sampler's values from shapjax's on the same permutations, relative to the
  largest value (``run_sharded`` None: no mesh)."""
  import numpy as np

  reference = np.asarray(run_shapjax().values)
  scale = float(np.abs(reference).max())
  agreement = {}
  if run_sharded is not None:
    agreement["shapjax sharded"] = float(np.abs(np.asarray(run_sharded().values) - reference).max() / scale)
  for name, values in [
      ("torch eager", run_torch(module, args.batch_size)[0].mean(0)),
      ("torch.compile", run_torch(compiled, args.batch_size)[0].mean(0)),
      ("captum eager", run_captum(module, args.batch_size, orders)[0]),
  ]:
    values = values.detach().cpu().numpy()
    agreement[name] = float(np.abs(values[:n_regions] - reference[:n_regions]).max() / scale)
  agreement["max_abs_value"] = scale
  return agreement


def attribution_section(args, params, module, compiled, image, labels, n_regions, device) -> tuple[list, dict]:
  import jax

  import shapjax
  from benchmarks import torch_reference
  from shapjax import masking

  key = jax.random.key(1)
  n_perm, max_regions = args.n_perm, args.regions
  baseline = masking.make_baseline(image, "blur")
  t_image = torch_reference.to_nchw(image, device)
  t_baseline = torch_reference.to_nchw(baseline, device)
  t_labels, t_ranks, orders = _torch_players(labels, key, n_perm, max_regions, n_regions, device)

  def run_shapjax(batch_size=args.batch_size, mesh=None):
    return shapjax.attribute(params, image, labels, n_perm, key=key, max_regions=max_regions,
                             batch_size=batch_size, mesh=mesh)

  def loss_of(net):
    return lambda x: torch_reference.reconstruction_loss(net, x)

  def run_torch(net, batch_size):
    return torch_reference.torch_permutation_shapley(loss_of(net), t_image, t_labels, t_baseline, t_ranks,
                                                     n_regions, batch_size=batch_size)

  def run_captum(net, ppe, given=None):
    return torch_reference.captum_shapley(loss_of(net), t_image, t_labels, t_baseline, n_perm,
                                          perturbations_per_eval=ppe, orders=given)

  return _time_samplers(args, run_shapjax, module, compiled, run_torch, run_captum, device, orders, n_perm,
                        n_regions)


def inpainting_section(args, device) -> dict:
  """shapjax's inpainting game against the PyTorch samplers on the same inpainter, image and regions.

  The PyTorch side plays ``torch_reference.inpainting_game``: both samplers get the image ``1`` and the baseline
  ``0`` of one channel, so their composites (captum's perturbed inputs too) are the coalitions' visibility masks.

  Returns:
    ``{"methods": [...], "flops": ..., "agreement": {...}, ...}`` with the timed methods (matrix products
    included) for :func:`_rate_rows`.
  """
  import jax
  import numpy as np
  import torch

  import shapjax
  from benchmarks import torch_reference

  params = shapjax.init_inpainter(args.inpaint_shape, key=jax.random.key(0), context=args.inpaint_context)
  config = params.config
  image = _make_image(args.inpaint_shape[0], shape=args.inpaint_shape)
  max_regions = args.inpaint_regions
  labels = _make_labels(image, max_regions)
  n_regions = int(np.max(labels)) + 1
  key = jax.random.key(1)
  n_perm = args.n_perm

  module = torch_reference.torch_inpainter(params, device=device)
  compiled = torch.compile(module)
  t_image = torch_reference.to_nchw(image, device)
  ones, zeros = torch_reference.inpainting_inputs(t_image)
  t_labels, t_ranks, orders = _torch_players(labels, key, n_perm, max_regions, n_regions, device)

  def run_shapjax(batch_size=args.batch_size, mesh=None):
    return shapjax.attribute(params, image, labels, n_perm, key=key, max_regions=max_regions,
                             batch_size=batch_size, game="inpainting", mesh=mesh)

  def run_torch(net, batch_size):
    return torch_reference.torch_permutation_shapley(torch_reference.inpainting_game(net, t_image), ones, t_labels,
                                                     zeros, t_ranks, n_regions, batch_size=batch_size)

  def run_captum(net, ppe, given=None):
    return torch_reference.captum_shapley(torch_reference.inpainting_game(net, t_image), ones, t_labels, zeros,
                                          n_perm, perturbations_per_eval=ppe, orders=given)

  methods, agreement = _time_samplers(args, run_shapjax, module, compiled, run_torch, run_captum, device, orders,
                                     n_perm, n_regions)
  return {"methods": methods, "flops": inpainter_flops(config), "agreement": agreement, "config": config.to_dict(),
          "regions": n_regions, "max_regions": max_regions, "n_perm": n_perm}


# The bars the inpainting section must clear: (label, rows compared with, least speed-up of shapjax).
INPAINTING_BARS = (("captum + torch.compile", "captum compile", 1.2),
                   ("hand-batched sampler, eager", "torch sampler eager", 1.0))


def inpainting_bars(methods) -> list[dict]:
  """Each bar of :data:`INPAINTING_BARS` against the fastest of its rows (any batch size or ppe).

  shapjax is its first (reference) row: the mesh row with ``--cpu-devices``, else the one-device row.
  """
  rate = lambda m: m.n_evals / m.steady
  shapjax_rate = rate(methods[0])
  bars = []
  for label, prefix, least in INPAINTING_BARS:
    best = max((m for m in methods if m.name.startswith(prefix)), key=rate)
    speedup = shapjax_rate / rate(best)
    bars.append({"bar": f"shapjax >= {least:.1f}x {label}", "against": best.name, "least": least,
                 "speedup": speedup, "pass": bool(speedup >= least)})
  return bars


def adam_step(config, optimizer, mesh=None):
  """The minimal training step the benchmarks time: mean reconstruction loss, gradient, one optax update.

  Args:
    config: the :class:`shapjax.AutoencoderConfig` of the weights.
    optimizer: an optax optimizer.
    mesh: split the batch over its devices (data parallel, as ``shapjax.train(..., mesh=)`` does).

  Returns:
    jitted ``step(weights, opt_state, images) -> (weights, opt_state, loss)``, traced on its first call.
  """
  import jax
  import optax

  from shapjax import training

  loss_and_grads = training._loss_and_grads(config, mesh)  # the loss and gradients shapjax.train computes

  @jax.jit
  def step(weights, opt_state, x):
    loss, grads = loss_and_grads(weights, x)
    updates, opt_state = optimizer.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state, loss
  return step


def train_section(args, params, image, device) -> list:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch

  import shapjax
  from benchmarks import torch_reference

  batch = args.train_batch
  rng = np.random.default_rng(0)
  images = np.clip(image[None] + 0.05 * rng.standard_normal((batch, *image.shape)), 0, 1).astype(np.float32)
  optimizer = optax.adam(1e-3)

  def jax_stepper(step, weights, x):
    state = [weights, optimizer.init(weights)]

    def run():
      for _ in range(args.train_steps):
        state[0], state[1], loss = step(*state, x)
      jax.block_until_ready(loss)

    return run

  jax_steps = jax_stepper(adam_step(params.config, optimizer), params.weights, jnp.asarray(images))

  timages = torch_reference.to_nchw(images, device)

  def torch_stepper(compile_step):
    net = torch_reference.torch_autoencoder(params, device=device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def one():
      opt.zero_grad(set_to_none=True)
      loss = torch_reference.reconstruction_loss(net, timages).mean()
      loss.backward()
      opt.step()
      return loss

    one_step = torch.compile(one) if compile_step else one

    def run():
      for _ in range(args.train_steps):
        loss = one_step()
      return loss.item()

    return run

  mesh_rows = []
  if jax.device_count() > 1 and batch % jax.device_count() == 0:
    from shapjax import devices  # the shardings shapjax.train(..., mesh=) uses
    mesh = shapjax.make_mesh()
    weights, mesh_images = devices.replicate((params.weights, jnp.asarray(images)), mesh)
    mesh_step = adam_step(params.config, optimizer, mesh)
    mesh_steps = jax_stepper(mesh_step, weights, mesh_images)
    mesh_rows = [_Method(f"optax, batch split over a mesh of {mesh.size} devices", mesh_steps,
                         n_evals=args.train_steps, kind="train")]
  methods = [
      *mesh_rows,
      _Method("optax (jax jit)", jax_steps, n_evals=args.train_steps, kind="train"),
      _Method("torch eager", _torch_sync(torch_stepper(False), device), n_evals=args.train_steps, kind="train"),
      _Method("torch.compile", _torch_sync(torch_stepper(True), device), n_evals=args.train_steps, kind="train"),
  ] + matmul_methods(args.matmul_size)
  _interleave(methods, args.rounds)
  return methods


def _child_shape_args(args) -> list[str]:
  batch = [] if args.batch_size is None else ["--batch-size", str(args.batch_size)]
  return ["--size", str(args.size), "--regions", str(args.regions), *batch]


def memory_section(args) -> list:
  results = []
  for n_perm in args.rss_n_perm:
    command = [sys.executable, os.path.abspath(__file__), "--child", "rss", "--child-n-perm", str(n_perm),
               *_child_shape_args(args)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=args.child_env)
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  # XLA's planned temporaries for the big n_perm the issue asks about, without running it.
  for n_perm in sorted({100, 2000} - set(args.rss_n_perm)):
    command = [sys.executable, os.path.abspath(__file__), "--child", "rss", "--child-n-perm", str(n_perm),
               *_child_shape_args(args), "--child-compile-only"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=args.child_env)
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  return results


def cold_start_section(args) -> list:
  results = []
  with tempfile.TemporaryDirectory() as cache:
    for label, cache_dir in [("no cache", ""), ("cache, first run (cold)", cache), ("cache, warm", cache)]:
      command = [sys.executable, os.path.abspath(__file__), "--child", "cold", "--child-n-perm", "2",
                 *_child_shape_args(args), "--child-cache", cache_dir, "--child-start", repr(time.time())]
      out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=args.child_env)
      marks = json.loads(out.stdout.strip().splitlines()[-1])
      marks["run"] = label
      results.append(marks)
  return results


# ----------------------------------------------------------------------------------------------------------
# Report.

def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _rate_rows(methods, reference, flops, unit):
  """Table rows and JSON records; the share of the ceiling uses matrix products timed in the same rounds."""
  ceiling = ceiling_of(methods)["ceiling"]
  methods = [m for m in methods if m.kind != "matmul"]
  rows, records = [], []
  reference_rate = reference.n_evals / reference.steady
  for m in methods:
    rate = m.n_evals / m.steady
    record = {"method": m.name, "compile_or_first_s": m.first, "steady_s": m.steady, "rounds": m.times,
              f"{unit}_per_s": rate, "jax_speedup": reference_rate / rate}
    row = [m.name, f"{m.first:.2f}", f"{m.steady:.3f}", f"{rate:.3g}", f"{reference_rate / rate:.2f}x"]
    if flops:
      gflops = rate * flops / 1e9
      record["useful_gflops"] = gflops
      record["share_of_ceiling"] = gflops / ceiling
      row += [f"{gflops:.0f}", f"{100 * gflops / ceiling:.0f}%"]
    rows.append(row)
    records.append(record)
  return rows, records


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="fewer rounds and captum settings, smaller memory run")
  parser.add_argument("--size", type=int, default=128, help="image side (square, 3 channels)")
  parser.add_argument("--regions", type=int, default=64, help="max_regions (SLIC regions, padded)")
  parser.add_argument("--n-perm", type=int, default=None, help="permutations per attribution")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="shapjax batch_size (composites per call; default: shapjax's, 16 on CPU, 64 elsewhere)")
  parser.add_argument("--torch-batch-sizes", default="16,64", help="batch sizes of the hand-batched torch sampler")
  parser.add_argument("--rounds", type=int, default=None, help="steady-state rounds per method")
  parser.add_argument("--sections", default="forward,attribution,inpainting,train,memory,cold",
                      help="comma-separated subset of forward,attribution,inpainting,train,memory,cold")
  parser.add_argument("--inpaint-shape", default="160,64,1",
                      help="H,W,C of the inpainting section's image and inpainter (default features)")
  parser.add_argument("--inpaint-regions", type=int, default=32, help="max_regions of the inpainting section")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads(N) for every PyTorch row (default: PyTorch's own, one per core); "
                      "on a busy machine its OpenMP threads lose much more to oversubscription than JAX's pool")
  parser.add_argument("--inpaint-context", default="none", choices=("none", "lowres"),
                      help="the inpainter's context (see shapjax.InpainterConfig)")
  parser.add_argument("--matmul-size", type=int, default=None,
                      help="side of the matrix product that measures the ceiling (default 2048; --quick 1024)")
  parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/<backend>.json)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child-n-perm", type=int, default=100, help=argparse.SUPPRESS)
  parser.add_argument("--captum-ppe", default=None,
                      help="captum perturbations_per_eval values to try (default 16,64; --quick 64)")
  parser.add_argument("--rss-n-perm", default=None,
                      help="n_perm values for the memory section (default 100,2000; --quick 100,400)")
  parser.add_argument("--child-compile-only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--child-cache", default="", help=argparse.SUPPRESS)
  parser.add_argument("--child-start", default="0", help=argparse.SUPPRESS)
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="on CPU: shapjax.use_cpu_devices(N) (N devices, one per core; child processes keep "
                      "the default single device) and add a row for attribute(mesh=make_mesh()) over them")
  parser.add_argument("--sharded-batch-size", type=int, default=None,
                      help="batch_size per device of the mesh row (default: shapjax's)")
  args = parser.parse_args(argv)
  args.child_env = dict(os.environ)
  if args.cpu_devices > 0 and not args.child:
    import shapjax
    shapjax.use_cpu_devices(args.cpu_devices)
  if args.child == "rss":
    return _child_rss(args)
  if args.child == "cold":
    return _child_cold(args)

  args.rounds = args.rounds or (2 if args.quick else 4)
  args.n_perm = args.n_perm or (8 if args.quick else 16)
  args.torch_batch_sizes = [int(n) for n in args.torch_batch_sizes.split(",")]
  args.captum_ppe = [int(n) for n in (args.captum_ppe or ("64" if args.quick else "16,64")).split(",")]
  args.rss_n_perm = [int(n) for n in (args.rss_n_perm or ("100,400" if args.quick else "100,2000")).split(",")]
  args.train_batch = 8 if args.quick else 16
  args.matmul_size = args.matmul_size or (1024 if args.quick else 2048)
  args.train_steps = 2 if args.quick else 3
  args.inpaint_shape = tuple(int(n) for n in args.inpaint_shape.split(","))
  sections = set(args.sections.split(","))

  import jax
  import numpy as np
  import torch

  import shapjax
  from benchmarks import report as report_file
  from benchmarks import torch_reference
  from shapjax import sampling

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)
  backend = jax.default_backend()
  args.batch_size = sampling.default_batch_size(args.batch_size)
  report = {
      "command": " ".join([os.path.relpath(sys.executable, ROOT), "benchmarks/throughput.py", *sys.argv[1:]]),
      "jax_backend": backend, "jax_devices": [str(d) for d in jax.devices()], "torch_device": str(device),
      "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.processor()
      or platform.machine(), "jax": jax.__version__, "torch": torch.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
  }
  params = shapjax.init_autoencoder((args.size, args.size, 3), key=jax.random.key(0))
  config = params.config
  flops = model_flops(config)
  report["model"] = {"config": config.to_dict(), "gflop_per_image": flops / 1e9}
  image = _make_image(args.size)
  labels = _make_labels(image, args.regions)
  n_regions = int(np.max(labels)) + 1
  report["regions"] = n_regions
  report["n_perm"] = args.n_perm
  print(f"# shapjax vs PyTorch: {backend} / torch {device}, {args.size}x{args.size}x3, {n_regions} regions "
        f"(max_regions {args.regions}), n_perm {args.n_perm}, {flops / 1e9:.3f} GFLOP per image", flush=True)

  module = torch_reference.torch_autoencoder(params, device=device)
  compiled = torch.compile(module)
  report["matmul"] = {}
  out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{backend}{'-quick' if args.quick else ''}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)

  def save():  # after every section, so a long run that dies late keeps what it measured
    report_file.write_json(report, out)

  def print_ceiling(section, methods):
    report["matmul"][section] = ceiling = ceiling_of(methods)
    save()
    print(f"\nfloat32 {args.matmul_size}^2 matrix product in the same rounds (GFLOP/s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()), flush=True)
  if "forward" in sections:
    methods = forward_section(args, params, module, compiled, image, args.batch_size, args.rounds, device)
    rows, report["forward"] = _rate_rows(methods, methods[0], flops, "images")
    print(f"\n## Forward pass, batch {args.batch_size}\n")
    print(_table(["method", "first call s", "steady s", "images/s", "jax speed-up", "GFLOP/s", "of ceiling"],
                 rows), flush=True)
    print_ceiling("forward", methods)
  if "attribution" in sections:
    methods, agreement = attribution_section(args, params, module, compiled, image, labels, n_regions, device)
    rows, report["attribution"] = _rate_rows(methods, methods[0], flops, "evals")
    report["agreement"] = agreement
    print(f"\n## Attribution: n_perm {args.n_perm}, {n_regions} regions (evals: model evaluations made)\n")
    print(_table(["method", "first call s", "steady s", "evals/s", "shapjax speed-up", "GFLOP/s", "of ceiling"],
                 rows))
    print("\nAgreement with shapjax on the same permutations (max |difference| / max |value|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items() if k != "max_abs_value"), flush=True)
    print_ceiling("attribution", methods)
  if "inpainting" in sections:
    section = inpainting_section(args, device)
    methods = section.pop("methods")
    rows, records = _rate_rows(methods, methods[0], section["flops"], "evals")
    bars = inpainting_bars([m for m in methods if m.kind != "matmul"])
    report["inpainting"] = {**section, "methods": records, "bars": bars}
    height, width, channels = args.inpaint_shape
    print(f"\n## Inpainting game: {height}x{width}x{channels} inpainter (context {args.inpaint_context!r}, "
          f"{section['flops'] / 1e9:.3f} GFLOP per image), n_perm {section['n_perm']}, {section['regions']} regions "
          f"(max_regions {section['max_regions']})\n")
    print(_table(["method", "first call s", "steady s", "evals/s", "shapjax speed-up", "GFLOP/s", "of ceiling"],
                 rows))
    print()
    print(_table(["bar", "fastest PyTorch row", "shapjax speed-up", "result"],
                 [[b["bar"], b["against"], f"{b['speedup']:.2f}x", "PASS" if b["pass"] else "FAIL"] for b in bars]))
    print("\nAgreement with shapjax on the same permutations (max |difference| / max |value|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in section["agreement"].items() if k != "max_abs_value"), flush=True)
    print_ceiling("inpainting", methods)
  if "train" in sections:
    methods = train_section(args, params, image, device)
    rows, report["train"] = _rate_rows(methods, methods[0], 3 * flops * args.train_batch, "steps")
    print(f"\n## Training steps (forward + backward + Adam), batch {args.train_batch}\n")
    print(_table(["method", "first call s", f"steady s / {args.train_steps} steps", "steps/s", "jax speed-up",
                  "GFLOP/s (3x fwd)", "of ceiling"], rows), flush=True)
    print_ceiling("train", methods)
  if "memory" in sections:
    report["memory"] = memory_section(args)
    print(f"\n## Peak RSS of attribute() in a fresh process ({n_regions} regions)\n")
    print(_table(["n_perm", "evals", "seconds", "XLA temporaries MiB", "peak RSS MiB before attribute",
                  "peak RSS MiB"],
                 [[r["n_perm"], r.get("n_evals", "not run"), f"{r.get('seconds', float('nan')):.1f}",
                   f"{r['xla_temp_mib']:.1f}", f"{r.get('peak_rss_mib_before_attribute', float('nan')):.0f}",
                   f"{r.get('peak_rss_mib', float('nan')):.0f}"] for r in report["memory"]]), flush=True)
    save()
  if "cold" in sections:
    report["cold_start"] = cold_start_section(args)
    print("\n## New process to first attribute() result (n_perm 2), seconds since process start\n")
    print(_table(["run", "import", "init", "segment", "first result", "next image (s)"],
                 [[r["run"], f"{r['import']:.1f}", f"{r['init']:.1f}", f"{r['segment']:.1f}",
                   f"{r['first_result']:.1f}", f"{r['second_image_seconds']:.2f}"] for r in report["cold_start"]]),
          flush=True)
  save()
  print(f"\nwrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
  main()
