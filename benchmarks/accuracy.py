"""Accuracy of the Shapley estimators on real images, against exact values, per evaluation and per second.

For each of ``--n-images`` defective test images (resized, split into at most ``--regions`` SLIC regions, so
exact values by enumerating all ``2 ** R`` coalitions are affordable and cached to disk), every shapjax
estimator runs blocks of its smallest unit (1 permutation, 1 antithetic pair, 1 stratified group of 16, 1
kernel unit; one compiled program per estimator, reused for every block and image) and records, after 1, 2,
4, ... blocks, the relative L2 error against the exact values, the Spearman
rank correlation, the overlap of the top-3 regions, the coverage of the 95% intervals (values +- 1.96
stderr) and the wall time. captum's ``ShapleyValueSampling`` runs on a PyTorch twin of the same model (weights
converted by ``benchmarks/torch_reference.py``), image, regions and baseline.

Summary: per image, the evaluations (and seconds) each method needs to reach ``--target`` relative L2 error
(and a 5x stricter one), interpolated in log-log between budgets; when the target is met at the smallest
budget, that budget's cost (an upper bound), and when not met by the last one, the Monte Carlo 1/sqrt(n)
extrapolation (both counted as "not interpolated"); then the median over images.
``--from-json`` recomputes the summary of a previous run without running anything. Prints a markdown table, writes JSON and a PNG.

Command (about 10 minutes on 2 shared CPU cores):

  .venv/bin/python benchmarks/accuracy.py ../shared/data/magnetic_tile --out benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shapjax  # noqa: E402
from shapjax import attribution, model, sampling  # noqa: E402

BASELINE = "blur"
# The smallest unit of each estimator, so that the first budget is as small as the estimator allows.
BLOCK = {"permutation": 1, "antithetic": 2, "stratified": sampling.STRATIFIED_GROUP, "kernel": 1}
BLUR_SIGMA = 4.0


def read_grey(path: Path, size: int) -> np.ndarray:
  image = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
  return (np.asarray(image, np.float32) / 255.0)[..., None]


def list_images(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))


def train_autoencoder(data: Path, size: int, steps: int, cache: Path) -> model.AutoencoderParams:
  """A small autoencoder trained with optax on ``train/good`` (cached by its settings)."""
  config = model.AutoencoderConfig(image_shape=(size, size, 1), features=(16, 32, 64), latent_features=16)
  params = model.init_autoencoder(config.image_shape, key=jax.random.key(0), config=config)
  tag = hashlib.sha1(f"{data.resolve()}|{size}|{steps}|{config}".encode()).hexdigest()[:12]
  path = cache / f"autoencoder_{tag}.msgpack"
  if path.exists():
    return params.replace(weights=flax.serialization.from_bytes(params.weights, path.read_bytes()))
  train = np.stack([read_grey(p, size) for p in list_images(data / "train" / "good")])
  optimizer = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)

  @jax.jit
  def step(weights, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda w: model.reconstruction_loss(params.replace(weights=w), batch).mean())(weights)
    updates, opt_state = optimizer.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state, loss

  weights, opt_state = params.weights, optimizer.init(params.weights)
  rng = np.random.default_rng(0)
  for i in range(steps):
    batch = train[rng.choice(len(train), 32)]
    batch = np.where(rng.random() < 0.5, batch[:, :, ::-1], batch)
    weights, opt_state, loss = step(weights, opt_state, jnp.asarray(batch))
    if i % 100 == 0 or i == steps - 1:
      print(f"  train step {i:4d}  loss {float(loss):.5f}", flush=True)
  cache.mkdir(parents=True, exist_ok=True)
  path.write_bytes(flax.serialization.to_bytes(weights))
  return params.replace(weights=weights)


def pick_images(data: Path, n_images: int) -> list[Path]:
  """Defective test images, round-robin over defect types (deterministic)."""
  folders = [f for f in sorted((data / "test").iterdir()) if f.is_dir() and f.name != "good"]
  lists = [list_images(f) for f in folders]
  picked, i = [], 0
  while len(picked) < n_images:
    for files in lists:
      if i < len(files) and len(picked) < n_images:
        picked.append(files[i * 7 % len(files)])
    i += 1
  return picked


def exact_values(params, image, labels, max_regions, cache: Path, tag: str) -> np.ndarray:
  path = cache / f"exact_{tag}.npy"
  if path.exists():
    return np.load(path)
  n_regions = int(labels.max()) + 1
  options = attribution.AttributionOptions(max_regions=max_regions, baseline=BASELINE, blur_sigma=BLUR_SIGMA)
  value_fn = attribution.value_function(params, jnp.asarray(image), jnp.asarray(labels), None, options)
  exact = np.asarray(shapjax.exact_shapley(value_fn, n_regions, batch_size=256).values, np.float64)
  exact = np.concatenate([exact, np.zeros(max_regions - n_regions)])
  cache.mkdir(parents=True, exist_ok=True)
  np.save(path, exact)
  return exact


def metrics(estimate: np.ndarray, exact: np.ndarray, n_regions: int) -> dict:
  estimate, exact = np.asarray(estimate, np.float64)[:n_regions], exact[:n_regions]
  top_exact = set(np.argsort(-exact)[:3].tolist())
  top_estimate = set(np.argsort(-estimate)[:3].tolist())
  return {"rel_l2": float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact)),
          "spearman": float(stats.spearmanr(estimate, exact).statistic),
          "top3": len(top_exact & top_estimate) / 3}


def run_shapjax(params, image, labels, exact, *, estimator, block, n_blocks, max_regions, key) -> list[dict]:
  """Blocks of ``block`` units, recording the estimate after 1, 2, 4, ... blocks."""
  n_regions = int(labels.max()) + 1
  options = attribution.AttributionOptions(n_perm=block, max_regions=max_regions, batch_size=256,
                                           estimator=estimator, baseline=BASELINE, blur_sigma=BLUR_SIGMA)
  image, labels = jnp.asarray(image), jnp.asarray(labels)
  active = jnp.arange(max_regions) < n_regions
  start_time = time.perf_counter()
  block_fn = jax.jit(lambda state, start, v_empty_full: sampling.estimate_block(
      attribution.value_function(params, image, labels, None, options), max_regions, block, key=key, start=start,
      state=state, active=active, v_empty_full=v_empty_full, batch_size=256, estimator=estimator))
  v_empty_full = jax.jit(lambda: sampling.endpoint_values(
      attribution.value_function(params, image, labels, None, options), active))()
  state = sampling.init_state(max_regions, estimator)
  records = []
  for b in range(n_blocks):
    state, result = block_fn(state, jnp.asarray(b * block, jnp.int32), v_empty_full)
    if (b + 1) & b == 0:  # 1, 2, 4, ... blocks
      values = np.asarray(result.values)  # waits for the result
      seconds = time.perf_counter() - start_time
      stderr = np.asarray(result.stderr, np.float64)[:n_regions]
      inside = np.abs(values[:n_regions] - exact[:n_regions]) <= 1.96 * stderr
      # NaN error bars (a single stratified group) are no interval: left out of the coverage.
      coverage = float(np.mean(inside)) if np.all(np.isfinite(stderr)) else None
      records.append({"units": (b + 1) * block, "n_evals": int(result.n_evals), "seconds": seconds,
                      "coverage": coverage, **metrics(values, exact, n_regions)})
  return records


def run_captum(params, image, labels, exact, *, budgets, seed) -> list[dict]:
  import torch

  from benchmarks import torch_reference as ref

  torch.manual_seed(seed)
  module = ref.torch_autoencoder(params)
  baseline = np.asarray(shapjax.make_baseline(jnp.asarray(image), BASELINE, blur_sigma=BLUR_SIGMA))
  image_t, baseline_t = ref.to_nchw(image), ref.to_nchw(baseline)
  labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
  n_regions = int(labels.max()) + 1

  def forward(x):
    with torch.no_grad():
      return ref.reconstruction_loss(module, x)

  records = []
  for n_perm in budgets:
    start_time = time.perf_counter()
    values, n_evals = ref.captum_shapley(forward, image_t, labels_t, baseline_t, n_perm, perturbations_per_eval=256)
    seconds = time.perf_counter() - start_time
    records.append({"units": n_perm, "n_evals": int(n_evals), "seconds": seconds,
                    **metrics(values.numpy(), exact, n_regions)})
  return records


def cost_to_reach(records: list[dict], target: float, field: str) -> tuple[float, bool]:
  """``field`` (n_evals or seconds) where rel_l2 crosses ``target``, log-log interpolated, and a flag.

  The flag marks a cost that is not interpolated: the target was met at the first (smallest) budget, whose cost
  is returned, or not by the last one, extrapolated with the 1/sqrt(n) law.
  """
  xs = np.array([r[field] for r in records], np.float64)
  errors = np.array([r["rel_l2"] for r in records], np.float64)
  below = np.nonzero(errors <= target)[0]
  if below.size and below[0] == 0:
    # Met at the smallest budget the estimator has: that budget is the cost (an upper bound), flagged.
    return float(xs[0]), True
  if below.size:
    i = below[0]
    t = (np.log(target) - np.log(errors[i - 1])) / (np.log(errors[i]) - np.log(errors[i - 1]))
    return float(np.exp(np.log(xs[i - 1]) + t * (np.log(xs[i]) - np.log(xs[i - 1])))), False
  return float(xs[-1] * (errors[-1] / target) ** 2), True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("data", type=Path, help="dataset folder in the MVTec AD layout")
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
                      / "shapjax-accuracy")
  parser.add_argument("--n-images", type=int, default=10)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--regions", type=int, default=12)
  parser.add_argument("--train-steps", type=int, default=600)
  parser.add_argument("--max-units", type=int, default=64, help="largest budget, in permutations/units")
  parser.add_argument("--repeats", type=int, default=2, help="keys per image and estimator")
  parser.add_argument("--captum-budgets", type=str, default="1,2,4,8,16")
  parser.add_argument("--target", type=float, default=0.05)
  parser.add_argument("--estimators", type=str, default=",".join(sampling.ESTIMATORS))
  parser.add_argument("--from-json", type=Path, default=None, help="re-summarize a previous accuracy.json")
  args = parser.parse_args(argv)
  if args.from_json is not None:
    payload = json.loads(args.from_json.read_text())
    payload["summary"] = summarize(payload["runs"], payload["images"], args.target)
    print_table(payload["summary"], args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(payload, indent=1))
    plot(payload["runs"], payload["summary"], args)
    return
  estimators = args.estimators.split(",")
  captum_budgets = [int(b) for b in args.captum_budgets.split(",") if b]

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; training the autoencoder ...", flush=True)
  params = train_autoencoder(args.data, args.size, args.train_steps, args.cache)
  model_tag = hashlib.sha1(flax.serialization.to_bytes(params.weights)).hexdigest()[:10]

  images = []
  for path in pick_images(args.data, args.n_images):
    image = read_grey(path, args.size)
    labels = shapjax.segment(image, max_regions=args.regions, n_segments=args.regions)
    tag = hashlib.sha1(f"{path}|{args.size}|{args.regions}|{model_tag}".encode()).hexdigest()[:12]
    start_time = time.perf_counter()
    exact = exact_values(params, image, labels, args.regions, args.cache, tag)
    n_regions = int(labels.max()) + 1
    print(f"  {path.parent.name}/{path.name}: {n_regions} regions, exact values "
          f"({2 ** n_regions} evaluations) in {time.perf_counter() - start_time:.1f}s", flush=True)
    images.append({"path": str(path), "image": image, "labels": labels, "exact": exact, "n_regions": n_regions})

  results = {name: [] for name in estimators + ["captum"]}
  for name in estimators:
    # Compile once outside the clock: the program is the same for every image and key.
    warm = images[0]
    block = BLOCK[name]
    run_shapjax(params, warm["image"], warm["labels"], warm["exact"], estimator=name, block=block, n_blocks=1,
                max_regions=args.regions, key=jax.random.key(99))
    for i, item in enumerate(images):
      for r in range(args.repeats):
        key = jax.random.fold_in(jax.random.key(r), i)
        records = run_shapjax(params, item["image"], item["labels"], item["exact"], estimator=name,
                              block=block, n_blocks=max(1, args.max_units // block), max_regions=args.regions,
                              key=key)
        results[name].append({"image": i, "repeat": r, "records": records})
    print(f"  {name}: done", flush=True)
  if captum_budgets:
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for i, item in enumerate(images):
      records = run_captum(params, item["image"], item["labels"], item["exact"], budgets=captum_budgets, seed=i)
      results["captum"].append({"image": i, "repeat": 0, "records": records})
    print("  captum: done", flush=True)

  summary = summarize(results, images, args.target)
  print_table(summary, args)
  args.out.mkdir(parents=True, exist_ok=True)
  payload = {"settings": {k: str(v) for k, v in vars(args).items()},
             "jax": jax.__version__, "images": [{"path": it["path"], "n_regions": it["n_regions"]} for it in images],
             "summary": summary, "runs": results}
  (args.out / "accuracy.json").write_text(json.dumps(payload, indent=1))
  plot(results, summary, args)
  print(f"wrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.png'}")


def _mean_coverage(records):
  values = [r["coverage"] for r in records if r.get("coverage") is not None]
  return float(np.mean(values)) if values else None


def summarize(results, images, target) -> dict:
  summary = {}
  for name, runs in results.items():
    if not runs:
      continue
    per_image = {}
    for run in runs:
      per_image.setdefault(run["image"], []).append(run["records"])
    evals_to, seconds_to, extrapolated, strict_to, strict_extrapolated = [], [], 0, [], 0
    for curves in per_image.values():
      # Average the error curves over repeats first, then find the crossing.
      mean_curve = [dict(column[0], rel_l2=float(np.mean([c["rel_l2"] for c in column])),
                         seconds=float(np.median([c["seconds"] for c in column])))
                    for column in zip(*curves)]
      evals, flag_e = cost_to_reach(mean_curve, target, "n_evals")
      seconds, _ = cost_to_reach(mean_curve, target, "seconds")
      evals_to.append(evals)
      seconds_to.append(seconds)
      extrapolated += int(flag_e)
      strict, flag_s = cost_to_reach(mean_curve, target / 5, "n_evals")
      strict_to.append(strict)
      strict_extrapolated += int(flag_s)
    records = [rec for run in runs for rec in run["records"]]
    by_budget = {}
    for rec in records:
      by_budget.setdefault(rec["units"], []).append(rec)
    summary[name] = {
        "evals_to_target_median": float(np.median(evals_to)),
        "seconds_to_target_median": float(np.median(seconds_to)),
        "evals_to_target_per_image": evals_to,
        "seconds_to_target_per_image": seconds_to,
        "images_extrapolated": extrapolated,
        "evals_to_strict_target_median": float(np.median(strict_to)),
        "images_extrapolated_strict": strict_extrapolated,
        "coverage": _mean_coverage(records),
        "curve": [{"units": u, "n_evals_median": float(np.median([r["n_evals"] for r in rs])),
                   "seconds_median": float(np.median([r["seconds"] for r in rs])),
                   "rel_l2_median": float(np.median([r["rel_l2"] for r in rs])),
                   "spearman_median": float(np.median([r["spearman"] for r in rs])),
                   "top3_mean": float(np.mean([r["top3"] for r in rs])),
                   "coverage": _mean_coverage(rs)}
                  for u, rs in sorted(by_budget.items())],
    }
  return summary


def print_table(summary, args):
  base = summary.get("permutation", {}).get("evals_to_target_median")
  captum_seconds = summary.get("captum", {}).get("seconds_to_target_median")
  print(f"\n{args.n_images} images, <= {args.regions} regions, {args.size}x{args.size}; target relative L2 error "
        f"{args.target:.0%}; medians over images\n")
  strict_base = summary.get("permutation", {}).get("evals_to_strict_target_median")
  print(f"| estimator | evals to {args.target:.0%} (not interp.) | vs permutation | seconds to {args.target:.0%} "
        f"| vs captum | evals to {args.target / 5:.0%} (not interp.) | vs permutation | coverage of 95% CI "
        "| rel. L2 @ ~350 evals | Spearman @ ~350 evals | top-3 overlap @ ~350 evals |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, s in summary.items():
    at = min(s["curve"], key=lambda c: abs(np.log(c["n_evals_median"] / 350)))
    strict_ratio = f"{strict_base / s['evals_to_strict_target_median']:.2f}x" if strict_base else "-"
    ratio = f"{base / s['evals_to_target_median']:.2f}x" if base else "-"
    speed = f"{captum_seconds / s['seconds_to_target_median']:.1f}x" if captum_seconds else "-"
    coverage = f"{s['coverage']:.3f}" if s["coverage"] is not None else "-"
    print(f"| {name} | {s['evals_to_target_median']:.1f} ({s['images_extrapolated']}) | {ratio} "
          f"| {s['seconds_to_target_median']:.4f} | {speed} | {s['evals_to_strict_target_median']:.0f} "
          f"({s['images_extrapolated_strict']}) | {strict_ratio} | {coverage} | {at['rel_l2_median']:.2e} "
          f"| {at['spearman_median']:.3f} | {at['top3_mean']:.2f} |")
  print()


def plot(results, summary, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for name, s in summary.items():
    curve = s["curve"]
    evals = [c["n_evals_median"] for c in curve]
    seconds = [c["seconds_median"] for c in curve]
    errors = [c["rel_l2_median"] for c in curve]
    style = "--" if name == "captum" else "-"
    axes[0].loglog(evals, errors, style, marker="o", label=name)
    axes[1].loglog(seconds, errors, style, marker="o", label=name)
    axes[2].semilogx(evals, [c["spearman_median"] for c in curve], style, marker="o", label=name)
  for ax in axes[:2]:
    ax.axhline(args.target, color="grey", lw=0.8)
    ax.set_ylabel("median relative L2 error vs exact")
  for ax in axes:
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axes[0].set_xlabel("value-function evaluations")
  axes[1].set_xlabel("wall time per image [s] (2 CPU cores)")
  axes[2].set_xlabel("value-function evaluations")
  axes[2].set_ylabel("median Spearman rank correlation")
  axes[0].legend()
  fig.suptitle(f"{args.data.name}: {args.n_images} images {args.size}x{args.size}, <= {args.regions} regions")
  fig.tight_layout()
  fig.savefig(args.out / "accuracy.png", dpi=110)


if __name__ == "__main__":
  main()
