"""Do N cores do N times the work? The same single-threaded JAX job alone, then in N processes at once.

    .venv/bin/python benchmarks/contention.py                      # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/contention.py --processes 2 --out benchmarks/results/contention.json

Each job runs in a fresh process on one XLA CPU device set up as each device of ``attribute(mesh=)`` and
``train(mesh=)`` is (``shapjax.use_cpu_devices(1)``), first alone, then in ``--processes`` processes that start the
timed calls together once all have compiled (no communication between them). Such a device runs its
convolutions on one thread, but XLA's matrix products (``dot``) still use the process's pool of one thread per core,
so a job "alone" may use more than one core: the table reports the CPU seconds per wall second of the timed
calls. ``--single-thread`` sets ``PJRT_NPROC=1`` in the children (XLA's pool of one thread): one core per job. Jobs: a 1024^2 float32 matrix product; the default
autoencoder's forward pass + loss at batch 16 (an attribution chunk); one training step (forward, backward,
Adam) at batch 8. The aggregate speed-up is ``processes * alone / together``: N when the cores are independent.
It tells whether a data-parallel mesh can scale on this machine, whatever the program. Prints a markdown table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

JOBS = ("matmul", "forward", "train")


def _child(job: str, size: int, repeats: int, sync_dir: str, index: int) -> None:
  import shapjax

  shapjax.use_cpu_devices(1)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  rng = np.random.default_rng(0)
  # Inputs are arguments, not captured constants (which XLA would fold at compile time).
  if job == "matmul":
    inputs = (jnp.asarray(rng.random((1024, 1024), dtype=np.float32)),)
    fn = jax.jit(lambda a: a @ a)
  else:
    params = shapjax.init_autoencoder((size, size, 3), key=jax.random.key(0))
    batch = 16 if job == "forward" else 8
    images = jnp.asarray(rng.random((batch, size, size, 3), dtype=np.float32))
    if job == "forward":
      inputs = (params, images)
      fn = jax.jit(shapjax.reconstruction_loss)
    else:
      from benchmarks.throughput import adam_step  # the training step throughput.py and layers.py time

      optimizer = optax.adam(1e-3)
      inputs = (params.weights, optimizer.init(params.weights), images)
      fn = adam_step(params.config, optimizer)
  jax.block_until_ready(fn(*inputs))
  open(os.path.join(sync_dir, f"ready-{index}"), "w").close()  # compiled; start together with the others
  while not os.path.exists(os.path.join(sync_dir, "go")):
    time.sleep(0.002)
  times = []
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - start)
  cores = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
  print(json.dumps({"median_s": float(np.median(times)), "times": times, "cores": cores}))


def _run(job: str, processes: int, args) -> tuple[list[float], list[float]]:
  """Median seconds per call and CPU seconds per wall second of each of ``processes`` children."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
  if args.single_thread:
    env["PJRT_NPROC"] = "1"  # the size of XLA's CPU thread pool
  with tempfile.TemporaryDirectory() as sync_dir:
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", job, "--size", str(args.size),
                               "--repeats", str(args.repeats), "--sync-dir", sync_dir, "--index", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for i in range(processes)]
    while len([n for n in os.listdir(sync_dir) if n.startswith("ready-")]) < processes:
      if any(p.poll() not in (None, 0) for p in procs):
        break  # a child failed before it was ready: reported below
      time.sleep(0.01)
    open(os.path.join(sync_dir, "go"), "w").close()
    medians, cores = [], []
    for proc in procs:
      out, err = proc.communicate(timeout=1800)
      if proc.returncode:
        raise RuntimeError(f"child {job} failed:\n{err[-2000:]}")
      result = json.loads(out.strip().splitlines()[-1])
      medians.append(result["median_s"])
      cores.append(result["cores"])
  return medians, cores


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=os.cpu_count() or 2, help="processes at once (default: cores)")
  parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
  parser.add_argument("--size", type=int, default=128, help="image side of the autoencoder jobs")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per process (median reported)")
  parser.add_argument("--single-thread", action="store_true",
                      help="PJRT_NPROC=1 in every child: XLA's thread pool of one thread, so one core per job")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "contention.json"))
  parser.add_argument("--child", choices=JOBS, help=argparse.SUPPRESS)
  parser.add_argument("--sync-dir", help=argparse.SUPPRESS)
  parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return _child(args.child, args.size, args.repeats, args.sync_dir, args.index)

  from benchmarks.report import write_json

  jobs = [j for j in args.jobs.split(",") if j]
  unknown = set(jobs) - set(JOBS)
  if unknown:
    parser.error(f"unknown jobs {sorted(unknown)}; choose from {JOBS}")
  rows = []
  print(f"| job | alone (ms) | cores used alone | {args.processes} at once (ms, per process) | aggregate speed-up |")
  print("|---|---|---|---|---|")
  for job in jobs:
    (alone,), (alone_cores,) = _run(job, 1, args)
    together, together_cores = _run(job, args.processes, args)
    mean_together = sum(together) / len(together)
    speedup = args.processes * alone / mean_together
    rows.append({"job": job, "alone_s": alone, "alone_cores": alone_cores, "together_s": together,
                 "together_cores": together_cores, "aggregate_speedup": speedup})
    print(f"| {job} | {alone * 1e3:.1f} | {alone_cores:.2f} | {', '.join(f'{t * 1e3:.1f}' for t in together)} | "
          f"{speedup:.2f}x |")
  report = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
            "processes": args.processes, "single_thread": args.single_thread,
            "cpu_count": os.cpu_count(), "size": args.size,
            "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "jobs": rows}
  write_json(report, args.out)
  print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
  main()
