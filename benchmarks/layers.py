"""Where the autoencoder's CPU time goes, and the two layer-level rewrites shapjax makes on CPU.

    .venv/bin/python benchmarks/layers.py                 # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/layers.py --batch 8 --out benchmarks/results/layers.json

Everything runs on one XLA CPU device with one thread (``--xla_cpu_multi_thread_eigen=false``, what
``shapjax.use_cpu_devices`` gives each device), interleaved over several rounds, best round reported:

* output layer: ``reconstruction_loss`` of the default model as shapjax computes it (the shuffle decoder's
  output convolution as a 2x2 convolution on the low-resolution tensor, loss compared phase by phase) against
  the same model with a plain full-resolution output convolution, depth-to-space and image-wise loss;
* kernel gradients: for every convolution of the default model, XLA's own kernel gradient (a convolution whose
  window is the whole feature map) against one matrix product per tap (what ``shapjax.model`` uses on CPU);
* one training step (forward, backward, Adam) with each kernel gradient;
* ``shapjax.attribute`` evaluations per second for several ``batch_size`` (the CPU default is 16).

Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _interleaved_best(fns: dict, rounds: int) -> dict:
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


def plain_reconstruction(params, images):
  """The shuffle-decoder autoencoder written out layer by layer with plain ``lax`` convolutions, its output
  layer a full-resolution convolution after depth-to-space: the reference for the phase-wise output layer
  (also the reference of ``tests/test_model.py``). ``f32[N, H, W, C] -> f32[N, H, W, C]``."""
  import jax
  import jax.numpy as jnp

  cfg, w = params.config, params.weights

  def conv(x, p, stride):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].reshape(1, 1, 1, -1)

  height, width = images.shape[1:3]
  x = jnp.pad(images, ((0, 0), (0, -height % cfg.stride), (0, -width % cfg.stride), (0, 0)), mode="edge")
  n = len(cfg.features)
  for i in range(n):
    x = jax.nn.relu(conv(x, w[f"Conv_{i}"], 2))
  x = jax.nn.relu(conv(x, w[f"Conv_{n}"], 1))
  for i in range(n + 1, 2 * n + 1):
    y = conv(x, w[f"Conv_{i}"], 1)
    b, h, wd, c = y.shape  # depth-to-space written out, independently of shapjax.model's
    x = jax.nn.relu(y.reshape(b, h, wd, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * wd, c // 4))
  return jax.nn.sigmoid(conv(x, w[f"Conv_{2 * n + 1}"], 1))[:, :height, :width]


def _plain_output_loss(params, images):
  import jax.numpy as jnp
  return jnp.mean(jnp.square(plain_reconstruction(params, images) - images), axis=(1, 2, 3))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8, help="images per call")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--attribute-batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[8, 16, 32, 64])
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "layers.json"))
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import shapjax
  from benchmarks.report import write_json
  from benchmarks.throughput import adam_step
  from shapjax import model

  params = shapjax.init_autoencoder((args.size, args.size, 3), key=jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).random((args.batch, args.size, args.size, 3)), jnp.float32)
  report = {"batch": args.batch, "size": args.size, "jax": jax.__version__, "backend": jax.default_backend(),
            "xla_flags": os.environ["XLA_FLAGS"]}

  # 1. Output layer.
  phase = jax.jit(shapjax.reconstruction_loss)
  plain = jax.jit(_plain_output_loss)
  np.testing.assert_allclose(phase(params, images), plain(params, images), rtol=1e-5)
  best = _interleaved_best({"phase": lambda: phase(params, images), "plain": lambda: plain(params, images)},
                           args.rounds)
  report["output_layer"] = {k: {"seconds": v, "images_per_s": args.batch / v} for k, v in best.items()}
  print(f"## Forward + loss, batch {args.batch}, {args.size}x{args.size}x3, one single-threaded CPU device\n")
  print("| output layer | ms | images/s |\n|---|---|---|")
  for name, label in [("plain", "full-resolution 3x3 conv, depth-to-space, image-wise loss"),
                      ("phase", "2x2 conv on the low-resolution tensor, phase-wise loss (shapjax)")]:
    print(f"| {label} | {best[name] * 1e3:.1f} | {args.batch / best[name]:.1f} |")

  # 2. Kernel gradients, layer by layer: the inputs and output gradients each convolution sees.
  nhwc = ("NHWC", "HWIO", "NHWC")
  layers = []
  h = args.size
  previous = 3
  cfg = params.config
  for f in cfg.features:
    layers.append((f"encoder {previous}->{f} stride 2", (args.batch, h, h, previous), (3, 3, previous, f), 2))
    h //= 2
    previous = f
  layers.append((f"bottleneck {previous}->{cfg.latent_features} 1x1", (args.batch, h, h, previous),
                 (1, 1, previous, cfg.latent_features), 1))
  previous = cfg.latent_features
  outputs = list(cfg.features[-2::-1]) + [max(cfg.features[0] // 2, 3)]
  for f in outputs:
    layers.append((f"decoder {previous}->{4 * f} at {h}x{h}", (args.batch, h, h, previous), (3, 3, previous, 4 * f),
                   1))
    h *= 2
    previous = f
  layers.append((f"output (phases) {4 * previous}->12 2x2 at {h // 2}x{h // 2}",
                 (args.batch, h // 2, h // 2, 4 * previous), (2, 2, 4 * previous, 12), 1))
  rng = np.random.default_rng(1)
  rows = []
  print(f"\n## Kernel gradient of each convolution, batch {args.batch}\n")
  print("| layer | XLA's own ms | per-tap products ms | speed-up |\n|---|---|---|---|")
  for name, x_shape, k_shape, stride in layers:
    x = jnp.asarray(rng.random(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    pads = (((1, 1), (1, 1)) if k_shape[0] == 2 else
            jax.lax.padtype_to_pads(x_shape[1:3], k_shape[:2], (stride, stride), "SAME"))
    pads = tuple(tuple(p) for p in pads)
    out_shape = jax.eval_shape(lambda x, k: jax.lax.conv_general_dilated(x, k, (stride, stride), pads,
                                                                         dimension_numbers=nhwc), x, kernel).shape
    dy = jnp.asarray(rng.random(out_shape), jnp.float32)

    def xla_grad(x, kernel, dy):
      _, vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(x, k, (stride, stride), pads, dimension_numbers=nhwc),
                       kernel)
      return vjp(dy)[0]

    taps = jax.jit(lambda x, dy: model._weight_grad_by_taps(x, dy, k_shape, (stride, stride), pads))
    xla = jax.jit(xla_grad)
    np.testing.assert_allclose(taps(x, dy), xla(x, kernel, dy), rtol=2e-4, atol=1e-3)
    best = _interleaved_best({"xla": lambda: xla(x, kernel, dy), "taps": lambda: taps(x, dy)}, args.rounds)
    rows.append({"layer": name, "xla_s": best["xla"], "taps_s": best["taps"]})
    print(f"| {name} | {best['xla'] * 1e3:.1f} | {best['taps'] * 1e3:.1f} | {best['xla'] / best['taps']:.2f}x |")
  report["kernel_gradients"] = rows

  # 3. One training step, each way.
  optimizer = optax.adam(1e-3)

  taps_step = adam_step(params.config, optimizer)
  original = model._taps_are_faster
  model._taps_are_faster = lambda *_: False
  try:
    xla_step = adam_step(params.config, optimizer)
    state = optimizer.init(params.weights)
    jax.block_until_ready(xla_step(params.weights, state, images))  # traced with XLA's kernel gradients
  finally:
    model._taps_are_faster = original
  jax.block_until_ready(taps_step(params.weights, state, images))
  best = _interleaved_best({"xla": lambda: xla_step(params.weights, state, images)[2],
                            "taps": lambda: taps_step(params.weights, state, images)[2]}, args.rounds)
  report["train_step"] = {k: {"seconds": v, "steps_per_s": 1 / v} for k, v in best.items()}
  print(f"\n## One training step (forward, backward, Adam), batch {args.batch}\n")
  print("| kernel gradients | ms | steps/s |\n|---|---|---|")
  print(f"| XLA's own | {best['xla'] * 1e3:.0f} | {1 / best['xla']:.2f} |")
  print(f"| per-tap products (shapjax on CPU) | {best['taps'] * 1e3:.0f} | {1 / best['taps']:.2f} |")

  # 4. Chunk size of attribute (coalitions per autoencoder call).
  from benchmarks.throughput import _make_image, _make_labels
  image = _make_image(args.size)
  labels = _make_labels(image, 64)
  calls = {}
  for batch_size in args.attribute_batch_sizes:
    calls[batch_size] = (lambda b=batch_size: shapjax.attribute(params, image, labels, 4, key=jax.random.key(1),
                                                                 max_regions=64, batch_size=b).values)
  best = _interleaved_best(calls, args.rounds)
  n_evals = int(shapjax.attribute(params, image, labels, 4, max_regions=64).n_evals)
  report["attribute_batch_size"] = {str(b): {"seconds": t, "evals_per_s": n_evals / t} for b, t in best.items()}
  print(f"\n## attribute, n_perm 4, {int(np.max(labels)) + 1} regions ({n_evals} evaluations), by batch_size\n")
  print("| batch_size | evals/s |\n|---|---|")
  for b, t in best.items():
    print(f"| {b} | {n_evals / t:.0f} |")

  write_json(report, args.out)
  print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
  main()
