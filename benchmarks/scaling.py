"""How attribution scales with the number of devices: images across devices and permutations across devices.

    .venv/bin/python benchmarks/scaling.py                       # 1, 2, 4, 8 fake CPU devices (~5-10 min, 2 cores)
    .venv/bin/python benchmarks/scaling.py --devices 1,2 --rounds 2
    .venv/bin/python benchmarks/scaling.py --real                # the real devices of this machine (GPU/TPU)

Each device count runs in a fresh process whose ``XLA_FLAGS`` carry ``--xla_force_host_platform_device_count=n``
(JAX reads it once, at start-up). Fake CPU devices share the machine's cores, so they show the *shape* of the
scaling (does splitting cost anything, does the program stay one compile per device count, where does the
communication go), not the speed of n real chips: with 2 physical cores the best possible speed-up is 2.

Two workloads, both checked against the one-device values of the same key:

* ``images``: ``attribute_batch(params, images, labels, n_perm, mesh=mesh)``, a batch of N images split across
  the devices (no communication);
* ``permutations``: ``attribute(params, image, labels, n_perm, mesh=mesh)``, one image whose
  permutations are split across the devices (one ``psum`` of per-region statistics).

The first call is reported as compile time (it includes the first run), the median of the other rounds as
steady-state time, always after ``block_until_ready``. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args) -> dict:
  import jax
  import numpy as np

  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  import shapjax

  n_devices = args.child
  mesh = shapjax.make_mesh(n_devices)
  rng = np.random.default_rng(0)
  smooth = np.cumsum(rng.normal(size=(args.images, args.size, args.size, 1)), axis=2)
  images = ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)
  labels = shapjax.segment_batch(images, max_regions=args.regions)
  params = shapjax.init_autoencoder((args.size, args.size, 1), key=jax.random.key(0), features=(16, 32, 64),
                                    latent_features=16)
  options = dict(max_regions=args.regions, batch_size=args.batch_size, key=jax.random.key(1))
  reference = {
      "images": np.asarray(shapjax.attribute_batch(params, images, labels, args.n_perm, **options).values),
      "permutations": np.asarray(shapjax.attribute(params, images[0], labels[0], args.n_perm_single,
                                                   **options).values),
  }
  workloads = {
      "images": lambda: shapjax.attribute_batch(params, images, labels, args.n_perm, mesh=mesh, **options),
      "permutations": lambda: shapjax.attribute(params, images[0], labels[0], args.n_perm_single, mesh=mesh,
                                                **options),
  }
  out = {"devices": n_devices, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
  for name, run in workloads.items():
    start = time.perf_counter()
    result = jax.block_until_ready(run())
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      result = jax.block_until_ready(run())
      times.append(time.perf_counter() - start)
    n_evals = int(np.sum(np.asarray(result.n_evals)))
    steady = statistics.median(times)
    out[name] = {"compile_s": compile_s, "steady_s": steady, "times_s": times, "n_evals": n_evals,
                 "evals_per_s": n_evals / steady,
                 "max_abs_diff_vs_one_device": float(np.max(np.abs(np.asarray(result.values) - reference[name])))}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", default="1,2,4,8", help="device counts to run, comma separated")
  parser.add_argument("--real", action="store_true", help="use this machine's real devices, no fake CPU devices")
  parser.add_argument("--images", type=int, default=16, help="images in the batch (images across devices)")
  parser.add_argument("--size", type=int, default=64, help="image side (square, grey)")
  parser.add_argument("--regions", type=int, default=32, help="max_regions")
  parser.add_argument("--n-perm", type=int, default=8, help="permutations per image for the batch")
  parser.add_argument("--n-perm-single", type=int, default=64, help="permutations for the single image")
  parser.add_argument("--batch-size", type=int, default=64, help="composites per model call")
  parser.add_argument("--rounds", type=int, default=3, help="steady-state rounds")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scaling.json"))
  parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child is not None:
    print(json.dumps(_child(args)))
    return

  rows = []
  for n_devices in [int(n) for n in args.devices.split(",")]:
    env = dict(os.environ)
    if not args.real:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
      env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, os.path.abspath(__file__), "--child", str(n_devices)] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("images", "size", "regions", "n_perm", "n_perm_single", "batch_size", "rounds")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
      sys.exit(f"{n_devices} devices failed:\n{done.stderr[-3000:]}")
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{n_devices} devices done", file=sys.stderr)

  base = {name: rows[0][name]["steady_s"] for name in ("images", "permutations")}
  print(f"\n{rows[0]['backend']} ({rows[0]['device_kind']}), {os.cpu_count()} CPU cores; "
        f"images: {args.images} x {args.size}x{args.size}x1, n_perm {args.n_perm}; "
        f"permutations: 1 image, n_perm {args.n_perm_single}; max_regions {args.regions}\n")
  print("| devices | images: compile (s) | images: steady (s) | speed-up | permutations: compile (s) | "
        "permutations: steady (s) | speed-up | max diff vs 1 device |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    images, perms = row["images"], row["permutations"]
    diff = max(images["max_abs_diff_vs_one_device"], perms["max_abs_diff_vs_one_device"])
    print(f"| {row['devices']} | {images['compile_s']:.1f} | {images['steady_s']:.2f} | "
          f"{base['images'] / images['steady_s']:.2f}x | {perms['compile_s']:.1f} | {perms['steady_s']:.2f} | "
          f"{base['permutations'] / perms['steady_s']:.2f}x | {diff:.1e} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
               "settings": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows}, f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
