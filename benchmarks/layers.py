"""Where the autoencoder's CPU time goes, and what each speed-up of ``shapjax.speedups`` gains today.

    .venv/bin/python benchmarks/layers.py                 # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/layers.py --batch 4 --rounds 5 --out benchmarks/results/layers.json

Everything runs on one XLA CPU device with one thread (``--xla_cpu_multi_thread_eigen=false``, what
``shapjax.use_cpu_devices`` gives each device), interleaved over several rounds, best round reported:

* output layer: ``reconstruction_loss`` of the default model as shapjax computes it (``speedups.ShuffleOutputConv``:
  a 2x2 convolution on the low-resolution tensor) against the same model written with plain convolutions;
* kernel gradients: for every convolution of the default model, XLA's own kernel gradient (a convolution whose
  window is the whole feature map) against one matrix product per tap (``speedups.conv_general_dilated``);
* one training step (loss and gradient) with XLA's kernel gradients, per tap over the whole batch, and per tap
  image by image (shapjax);
* forward options: ``reconstruction_loss`` and the inpainting U-Net's ``inpainting_loss`` (``--inpaint-shape``,
  default 160x64x1) under ``speedups.jit_forward`` against plain ``jax.jit``, batch 16;
* initialisation: compile and run time of ``init_autoencoder`` under ``speedups.jit_init`` against ``jax.jit``.

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


def _forward_options(loss_fn, inputs: tuple, rounds: int) -> dict:
  """Best times of ``loss_fn(*inputs)`` under ``speedups.jit_forward`` and plain ``jax.jit``, after checking that
  both give the same losses and that the options were used."""
  import jax
  import numpy as np

  from shapjax import speedups

  tuned = speedups.jit_forward(loss_fn)
  default = jax.jit(loss_fn)
  np.testing.assert_allclose(tuned(*inputs), default(*inputs), rtol=1e-5)
  assert tuned.uses_options(*inputs)
  return _interleaved_best({"jit_forward": lambda: tuned(*inputs), "jit": lambda: default(*inputs)}, rounds)


def plain_reconstruction(params, images):
  """The autoencoder written out layer by layer with plain ``lax`` convolutions (XLA's own gradients), its output
  layer a full-resolution convolution after depth-to-space: the reference for ``shapjax.speedups`` (also the
  reference of ``tests/test_model.py``). ``f32[N, H, W, C] -> f32[N, H, W, C]``; convolutional bottleneck only."""
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
    b, h, wd, c = y.shape  # depth-to-space written out, independently of shapjax's
    x = jax.nn.relu(y.reshape(b, h, wd, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * wd, c // 4))
  return jax.nn.sigmoid(conv(x, w[f"Conv_{2 * n + 1}"], 1))[:, :height, :width]


def _plain_loss(params, images):
  import jax.numpy as jnp
  return jnp.mean(jnp.square(plain_reconstruction(params, images) - images), axis=(1, 2, 3))


def _print_rows(title: str, header: str, rows: list[str]) -> None:
  print(f"\n## {title}\n\n{header}\n|{'---|' * header.count(' | ')}---|")
  for row in rows:
    print(row)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8, help="images per call (training and layers)")
  parser.add_argument("--forward-batch", type=int, default=16, help="images per call of the forward options")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--inpaint-shape", default="160,64,1", help="H,W,C of the inpainter of the forward options")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "layers.json"))
  args = parser.parse_args(argv)
  args.inpaint_shape = tuple(int(n) for n in args.inpaint_shape.split(","))
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

  import jax
  import jax.numpy as jnp
  import numpy as np

  import shapjax
  from benchmarks.report import write_json
  from shapjax import model, speedups

  assert speedups.enabled(), "run on the CPU backend without SHAPJAX_XLA_DEFAULTS"
  shape = (args.size, args.size, 3)
  params = shapjax.init_autoencoder(shape, key=jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((args.batch, *shape)), jnp.float32)
  report = {"batch": args.batch, "size": args.size, "jax": jax.__version__, "backend": jax.default_backend(),
            "xla_flags": os.environ["XLA_FLAGS"]}

  # 1. Output layer.
  shuffle = jax.jit(shapjax.reconstruction_loss)
  plain = jax.jit(_plain_loss)
  np.testing.assert_allclose(shuffle(params, images), plain(params, images), rtol=1e-5)
  best = _interleaved_best({"shuffle": lambda: shuffle(params, images), "plain": lambda: plain(params, images)},
                           args.rounds)
  report["output_layer"] = {k: {"seconds": v, "images_per_s": args.batch / v} for k, v in best.items()}
  _print_rows(f"Forward + loss, batch {args.batch}, {args.size}x{args.size}x3, one single-threaded CPU device",
              "| output layer | ms | images/s |",
              [f"| {label} | {best[name] * 1e3:.1f} | {args.batch / best[name]:.1f} |" for name, label in
               [("plain", "full-resolution 3x3 conv after depth-to-space"),
                ("shuffle", "2x2 conv on the low-resolution tensor (speedups.ShuffleOutputConv)")]])

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
  rows = []
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

    taps = jax.jit(lambda x, dy: speedups._weight_grad_by_taps(x, dy, k_shape, (stride, stride), pads))
    xla = jax.jit(xla_grad)
    np.testing.assert_allclose(taps(x, dy), xla(x, kernel, dy), rtol=2e-4, atol=1e-3)
    best = _interleaved_best({"xla": lambda: xla(x, kernel, dy), "taps": lambda: taps(x, dy)}, args.rounds)
    rows.append({"layer": name, "xla_s": best["xla"], "taps_s": best["taps"],
                 "taps_used": speedups._taps_are_faster(k_shape)})
  report["kernel_gradients"] = rows
  _print_rows(f"Kernel gradient of each convolution, batch {args.batch}",
              "| layer | XLA's own ms | per-tap products ms | speed-up | shapjax uses |",
              [f"| {r['layer']} | {r['xla_s'] * 1e3:.1f} | {r['taps_s'] * 1e3:.1f} | {r['xla_s'] / r['taps_s']:.2f}x | "
               f"{'per tap' if r['taps_used'] else 'XLA'} |" for r in rows])

  # 3. One training step (loss and gradient) with each kind of kernel gradient, chosen when the step is traced.
  def step():
    return jax.jit(jax.value_and_grad(lambda w: jnp.mean(shapjax.reconstruction_loss(params.replace(weights=w),
                                                                                     images))))

  steps = {}
  for name, taps_rule, min_pixels in [("xla", lambda _: False, None), ("taps_whole_batch", None, 10 ** 12),
                                      ("taps_per_image", None, None)]:
    saved = speedups._taps_are_faster, speedups._PER_IMAGE_MIN_PIXELS
    speedups._taps_are_faster = taps_rule or saved[0]
    speedups._PER_IMAGE_MIN_PIXELS = min_pixels or saved[1]
    try:
      steps[name] = step()
      jax.block_until_ready(steps[name](params.weights))  # traced now, with this choice
    finally:
      speedups._taps_are_faster, speedups._PER_IMAGE_MIN_PIXELS = saved
  best = _interleaved_best({name: (lambda f=f: f(params.weights)) for name, f in steps.items()}, args.rounds)
  report["train_step"] = {k: {"seconds": v, "steps_per_s": 1 / v} for k, v in best.items()}
  _print_rows(f"One training step (loss and gradient), batch {args.batch}", "| kernel gradients | ms | steps/s |",
              [f"| {label} | {best[name] * 1e3:.0f} | {1 / best[name]:.2f} |" for name, label in
               [("xla", "XLA's own"), ("taps_whole_batch", "per tap, whole batch"),
                ("taps_per_image", "per tap, image by image on big maps (shapjax)")]])

  # 4. Forward options (the attribution programs' jit), for the autoencoder and the inpainting U-Net.
  batch = jnp.asarray(rng.random((args.forward_batch, *shape)), jnp.float32)
  best = _forward_options(shapjax.reconstruction_loss, (params, batch), args.rounds)
  report["forward_options"] = {k: {"seconds": v, "images_per_s": args.forward_batch / v} for k, v in best.items()}
  inpainter = shapjax.init_inpainter(args.inpaint_shape, key=jax.random.key(0))
  holes = jnp.asarray(rng.random((args.forward_batch, *args.inpaint_shape)), jnp.float32)
  visible = jnp.asarray(rng.random((args.forward_batch, *args.inpaint_shape[:2])) < 0.5, jnp.float32)
  best_inpaint = _forward_options(shapjax.inpainting_loss, (inpainter, holes, visible), args.rounds)
  report["forward_options_inpainter"] = {k: {"seconds": v, "images_per_s": args.forward_batch / v}
                                         for k, v in best_inpaint.items()}
  height, width, channels = args.inpaint_shape
  _print_rows(f"Forward + loss, batch {args.forward_batch}", "| model | compiled with | ms | images/s |",
              [f"| {model_name} | {label} | {times[name] * 1e3:.1f} | {args.forward_batch / times[name]:.1f} |"
               for model_name, times in [(f"autoencoder {args.size}x{args.size}x3", best),
                                         (f"inpainter {height}x{width}x{channels}", best_inpaint)]
               for name, label in [("jit", "XLA's defaults (jax.jit)"),
                                   ("jit_forward", "YNN fusions (speedups.jit_forward)")]])

  # 5. Initialisation: one compile each, so timed once, from a cleared cache.
  init_times = {}
  for name, jit in [("jit", jax.jit), ("jit_init", speedups.jit_init)]:
    init = jit(model._init_weights.__wrapped__, static_argnames=("config",))
    jax.clear_caches()
    start = time.perf_counter()
    jax.block_until_ready(init(cfg, jax.random.key(1)))
    init_times[name] = time.perf_counter() - start
  report["init"] = {k: {"seconds": v} for k, v in init_times.items()}
  _print_rows("init_autoencoder of the default model, compile and run", "| compiled with | s |",
              [f"| XLA's defaults (jax.jit) | {init_times['jit']:.2f} |",
               f"| no LLVM optimisation (speedups.jit_init) | {init_times['jit_init']:.2f} |"])

  write_json(report, args.out)
  print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
  main()
