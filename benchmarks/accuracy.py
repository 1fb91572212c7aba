"""Accuracy of the semivalue estimators on real images, against exact values, per evaluation and per second.

For each of ``--n-images`` defective test images (resized, split into at most ``--regions`` SLIC regions, so
exact values by enumerating all ``2 ** R`` coalitions are affordable; the table of coalition values is cached to
disk and every index's exact values come from it), every shapjax estimator of every index in ``--indices``
(``shapley``, ``banzhaf``, ``beta16-1`` for ``("beta", 16, 1)``, ``loo``, ...) runs blocks of its smallest unit (1
permutation, 1 antithetic pair, 1 stratified group of 16, 1 kernel, paired or MSR unit; leave-one-out once; one
compiled program per estimator and index, reused for every block and image) and records, after 1, 2, 4, ...
blocks, the relative L2 error against the exact values, the Spearman rank correlation, the overlap of the top-3
regions, the coverage of the 95% intervals (values +- 1.96 stderr), the additivity measure and the wall time.
captum's ``ShapleyValueSampling`` runs on a PyTorch twin of the same model (weights converted by
``benchmarks/torch_reference.py``), image, regions and baseline (``--captum-budgets ""`` skips it). shapiq's
approximators for the same index (Shapley: ``PermutationSamplingSV``, ``KernelSHAP``, ``SVARM``; Banzhaf:
``SVARM`` and ``SHAPIQ`` with ``index="BV"``; shapiq has no Beta Shapley or leave-one-out) run on the same JAX
value function, at the budgets the permutation estimator used (``--shapiq ""`` skips them).

Summary: per image, the evaluations (and seconds) each method needs to reach ``--target`` relative L2 error
(and a 5x stricter one), interpolated in log-log between budgets; when the target is met at the smallest
budget, that budget's cost (an upper bound), and when not met by the last one, the Monte Carlo 1/sqrt(n)
extrapolation (both counted as "not interpolated"); then the median over images.
``--from-json`` recomputes the summary of a previous run without running anything. Prints a markdown table,
writes ``NAME.json`` and ``NAME.png`` (``--name``, default ``accuracy``).

Commands (2 shared CPU cores):

  # Shapley estimators against captum (about 20 minutes)
  .venv/bin/python benchmarks/accuracy.py ../shared/data/magnetic_tile --out benchmarks/results
  # every index against shapiq, reduced (docs/estimators.md)
  .venv/bin/python benchmarks/accuracy.py ../shared/data/magnetic_tile --out benchmarks/results \\
      --name accuracy-semivalues --indices shapley,banzhaf,beta16-1,beta4-1,loo --n-images 6 --max-units 32 \\
      --captum-budgets ""
  # the Beta Shapley rows alone (about 6 minutes)
  .venv/bin/python benchmarks/accuracy.py ../shared/data/magnetic_tile --out benchmarks/results \\
      --name accuracy-beta --indices beta16-1,beta4-1 --n-images 6 --max-units 32 --shapiq "" --captum-budgets ""
"""

from __future__ import annotations

import argparse
import functools
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
BLOCK = {"permutation": 1, "antithetic": 2, "stratified": sampling.STRATIFIED_GROUP, "kernel": 1, "paired": 1,
         "msr": 1, "exact": 1}
# shapiq's approximators of each index (class name, keyword arguments); shapiq has no Beta Shapley or LOO.
SHAPIQ_APPROXIMATORS = {
    "shapley": [("PermutationSamplingSV", {}), ("KernelSHAP", {}), ("SVARM", {"index": "SV"})],
    "banzhaf": [("SVARM", {"index": "BV"}), ("SHAPIQ", {"max_order": 1, "index": "BV"})],
}


def parse_index(name: str):
  """``shapley``, ``banzhaf``, ``loo`` or ``betaA-B`` (e.g. ``beta16-1``) -> the index in normal form."""
  if name.startswith("beta"):
    alpha, beta = name[4:].split("-")
    return sampling.check_index(("beta", float(alpha), float(beta)))
  return sampling.check_index(name)
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


def coalition_table(params, image, labels, max_regions, cache: Path, tag: str) -> np.ndarray:
  """``f64[2 ** n_regions]``: v of every coalition of the image's regions (cached), bit ``i`` = region ``i``."""
  path = cache / f"table_{tag}.npy"
  if path.exists():
    return np.load(path)
  n_regions = int(labels.max()) + 1
  options = attribution.AttributionOptions(max_regions=max_regions, baseline=BASELINE, blur_sigma=BLUR_SIGMA)
  value_fn = attribution.value_function(params, jnp.asarray(image), jnp.asarray(labels), None, options)
  table = np.asarray(sampling._all_coalition_values(value_fn, n_regions, 256), np.float64)
  cache.mkdir(parents=True, exist_ok=True)
  np.save(path, table)
  return table


def exact_values(table: np.ndarray, n_regions: int, max_regions: int, index) -> tuple[np.ndarray, float]:
  """The exact values of ``index`` padded to ``max_regions``, and the additivity over all coalitions."""
  result = sampling._exact_from_table(table, n_regions, index)
  exact = np.concatenate([np.asarray(result.values, np.float64), np.zeros(max_regions - n_regions)])
  return exact, float(result.additivity)


def metrics(estimate: np.ndarray, exact: np.ndarray, n_regions: int) -> dict:
  estimate, exact = np.asarray(estimate, np.float64)[:n_regions], exact[:n_regions]
  top_exact = set(np.argsort(-exact)[:3].tolist())
  top_estimate = set(np.argsort(-estimate)[:3].tolist())
  return {"rel_l2": float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact)),
          "spearman": float(stats.spearmanr(estimate, exact).statistic),
          "top3": len(top_exact & top_estimate) / 3}


@functools.partial(jax.jit, static_argnames=("options",))
def _endpoints(params, image, labels, active, *, options):
  return sampling.endpoint_values(attribution.value_function(params, image, labels, None, options), active)


# Module-level programs taking the image as an argument: one compilation serves every image, key and block.
@functools.partial(jax.jit, static_argnames=("options",))
def _block(params, image, labels, key, state, start, v_empty_full, active, *, options):
  return sampling.estimate_block(
      attribution.value_function(params, image, labels, None, options), options.max_regions, options.n_perm,
      key=key, start=start, state=state, active=active, v_empty_full=v_empty_full, batch_size=options.batch_size,
      estimator=options.estimator, index=options.index)


@functools.partial(jax.jit, static_argnames=("options",))
def _coalition_values(params, image, labels, coalitions, *, options):
  return attribution.value_function(params, image, labels, None, options)(coalitions)


def run_shapjax(params, image, labels, exact, *, estimator, block, n_blocks, max_regions, key,
                index="shapley") -> list[dict]:
  """Blocks of ``block`` units, recording the estimate after 1, 2, 4, ... blocks."""
  n_regions = int(labels.max()) + 1
  options = attribution.AttributionOptions(n_perm=block, max_regions=max_regions, batch_size=256,
                                           estimator=estimator, baseline=BASELINE, blur_sigma=BLUR_SIGMA,
                                           index=index)
  image, labels = jnp.asarray(image), jnp.asarray(labels)
  active = jnp.arange(max_regions) < n_regions
  start_time = time.perf_counter()
  v_empty_full = _endpoints(params, image, labels, active, options=options)
  state = sampling.init_state(max_regions, estimator)
  records = []
  for b in range(n_blocks):
    state, result = _block(params, image, labels, key, state, jnp.asarray(b * block, jnp.int32), v_empty_full,
                           active, options=options)
    if (b + 1) & b == 0:  # 1, 2, 4, ... blocks
      values = np.asarray(result.values)  # waits for the result
      seconds = time.perf_counter() - start_time
      stderr = np.asarray(result.stderr, np.float64)[:n_regions]
      inside = np.abs(values[:n_regions] - exact[:n_regions]) <= 1.96 * stderr
      # NaN error bars (a single stratified group) are no interval: left out of the coverage.
      # Exact values (leave-one-out) have no interval either.
      coverage = float(np.mean(inside)) if np.all(np.isfinite(stderr)) and np.any(stderr > 0) else None
      records.append({"units": (b + 1) * block, "n_evals": int(result.n_evals), "seconds": seconds,
                      "coverage": coverage, "additivity": float(result.additivity),
                      **metrics(values, exact, n_regions)})
  return records


def run_shapiq(params, image, labels, exact, *, name, kwargs, budgets, max_regions, seed) -> list[dict]:
  """One of shapiq's approximators on the same JAX value function, at each budget (evaluations)."""
  import shapiq.approximator

  n_regions = int(labels.max()) + 1
  options = attribution.AttributionOptions(max_regions=max_regions, baseline=BASELINE, blur_sigma=BLUR_SIGMA)
  image, labels = jnp.asarray(image), jnp.asarray(labels)
  value_fn = lambda coalitions: _coalition_values(params, image, labels, coalitions, options=options)
  chunk = 256  # fixed shapes: one compiled program whatever batch shapiq asks for
  calls = []

  def game(coalitions):
    coalitions = np.atleast_2d(np.asarray(coalitions, bool))
    calls.append(len(coalitions))
    padded = np.zeros((-(-len(coalitions) // chunk) * chunk, max_regions), bool)
    padded[:len(coalitions), :n_regions] = coalitions
    return np.concatenate([np.asarray(value_fn(jnp.asarray(padded[i:i + chunk])), np.float64)
                           for i in range(0, len(padded), chunk)])[:len(coalitions)]

  game(np.zeros((1, n_regions), bool))  # compiles outside the clock
  records = []
  for budget in budgets:
    approximator = getattr(shapiq.approximator, name)(n_regions, random_state=seed, **kwargs)
    calls.clear()
    start_time = time.perf_counter()
    estimate = approximator.approximate(budget=int(budget), game=game)
    seconds = time.perf_counter() - start_time
    values = np.array([float(estimate[(i,)]) for i in range(n_regions)])
    records.append({"units": int(budget), "n_evals": int(sum(calls)), "seconds": seconds,
                    **metrics(np.concatenate([values, np.zeros(max_regions - n_regions)]), exact, n_regions)})
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
  parser.add_argument("--estimators", type=str, default="",
                      help="shapjax estimators to run (default: every estimator of each index)")
  parser.add_argument("--indices", type=str, default="shapley",
                      help="comma-separated: shapley, banzhaf, loo, betaA-B (e.g. beta16-1)")
  parser.add_argument("--shapiq", type=str, default="auto",
                      help="'auto': shapiq's approximators of each index it has; '' skips them")
  parser.add_argument("--name", type=str, default="accuracy", help="results file stem: NAME.json, NAME.png")
  parser.add_argument("--from-json", type=Path, default=None, help="re-summarize a previous accuracy.json")
  args = parser.parse_args(argv)
  if args.from_json is not None:
    payload = json.loads(args.from_json.read_text())
    payload["summary"] = summarize(payload["runs"], payload["images"], args.target)
    print_table(payload["summary"], args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    plot(payload["runs"], payload["summary"], args)
    return
  index_names = [name for name in args.indices.split(",") if name]
  only = [name for name in args.estimators.split(",") if name]
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
    table = coalition_table(params, image, labels, args.regions, args.cache, tag)
    n_regions = int(labels.max()) + 1
    exact = {}
    for name in index_names:
      exact[name], additivity = exact_values(table, n_regions, args.regions, parse_index(name))
    print(f"  {path.parent.name}/{path.name}: {n_regions} regions, exact values ({2 ** n_regions} evaluations) "
          f"in {time.perf_counter() - start_time:.1f}s; additivity over all coalitions {additivity:.4f}", flush=True)
    images.append({"path": str(path), "image": image, "labels": labels, "exact": exact, "n_regions": n_regions,
                   "additivity": additivity})

  results = {}
  for index_name in index_names:
    index = parse_index(index_name)
    kind = sampling.index_kind(index)
    for name in sampling.INDEX_ESTIMATORS[kind]:
      if only and name not in only:
        continue
      label = name if index_name == "shapley" else f"{index_name}/{name}"
      results[label] = []
      # Compile once outside the clock: the program is the same for every image and key.
      warm = images[0]
      block = BLOCK[name]
      n_blocks = 1 if name == "exact" else max(1, args.max_units // block)
      run_shapjax(params, warm["image"], warm["labels"], warm["exact"][index_name], estimator=name, block=block,
                  n_blocks=1, max_regions=args.regions, key=jax.random.key(99), index=index)
      for i, item in enumerate(images):
        for r in range(1 if name == "exact" else args.repeats):
          key = jax.random.fold_in(jax.random.key(r), i)
          records = run_shapjax(params, item["image"], item["labels"], item["exact"][index_name], estimator=name,
                                block=block, n_blocks=n_blocks, max_regions=args.regions, key=key, index=index)
          results[label].append({"image": i, "repeat": r, "records": records})
      print(f"  {label}: done", flush=True)
    if args.shapiq and kind in SHAPIQ_APPROXIMATORS:
      for class_name, kwargs in SHAPIQ_APPROXIMATORS[kind]:
        label = f"shapiq {class_name}" + ("" if index_name == "shapley" else f" ({index_name})")
        results[label] = []
        for i, item in enumerate(images):
          # The budgets the permutation estimator spent on this image: 1, 2, 4, ... permutations.
          n_regions = item["n_regions"]
          budgets = [2 + u * (n_regions - 1) for u in (1, 2, 4, 8, 16, 32, 64, 128) if u <= args.max_units]
          for r in range(args.repeats):
            records = run_shapiq(params, item["image"], item["labels"], item["exact"][index_name], name=class_name,
                                 kwargs=kwargs, budgets=budgets, max_regions=args.regions, seed=100 * i + r)
            results[label].append({"image": i, "repeat": r, "records": records})
        print(f"  {label}: done", flush=True)
  if captum_budgets and "shapley" in index_names:
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results["captum"] = []
    for i, item in enumerate(images):
      records = run_captum(params, item["image"], item["labels"], item["exact"]["shapley"], budgets=captum_budgets,
                           seed=i)
      results["captum"].append({"image": i, "repeat": 0, "records": records})
    print("  captum: done", flush=True)

  summary = summarize(results, images, args.target)
  print_table(summary, args)
  args.out.mkdir(parents=True, exist_ok=True)
  payload = {"settings": {k: str(v) for k, v in vars(args).items()},
             "jax": jax.__version__,
             "images": [{"path": os.path.relpath(it["path"]), "n_regions": it["n_regions"],
                         "additivity_all_coalitions": it["additivity"]} for it in images],
             "summary": summary, "runs": results}
  (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
  plot(results, summary, args)
  print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")


def _median_field(records, field):
  values = [r[field] for r in records if r.get(field) is not None and np.isfinite(r[field])]
  return float(np.median(values)) if values else None


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
        "additivity_median": _median_field(records, "additivity"),
        "curve": [{"units": u, "n_evals_median": float(np.median([r["n_evals"] for r in rs])),
                   "seconds_median": float(np.median([r["seconds"] for r in rs])),
                   "rel_l2_median": float(np.median([r["rel_l2"] for r in rs])),
                   "spearman_median": float(np.median([r["spearman"] for r in rs])),
                   "top3_mean": float(np.mean([r["top3"] for r in rs])),
                   "coverage": _mean_coverage(rs)}
                  for u, rs in sorted(by_budget.items())],
    }
  return summary


def _index_of(label: str) -> str:
  """``"banzhaf/paired"`` -> ``"banzhaf"``; ``"shapiq SVARM (banzhaf)"`` -> ``"banzhaf"``; others are Shapley's."""
  if label.startswith("shapiq") and label.endswith(")"):
    return label[label.rindex("(") + 1:-1]
  return label.split("/")[0] if "/" in label else "shapley"


def print_table(summary, args):
  captum_seconds = summary.get("captum", {}).get("seconds_to_target_median")
  print(f"\n{args.n_images} images, <= {args.regions} regions, {args.size}x{args.size}; target relative L2 error "
        f"{args.target:.0%}; medians over images\n")
  print(f"| index | method | evals to {args.target:.0%} (not interp.) | seconds to {args.target:.0%} | vs captum "
        f"| evals to {args.target / 5:.0%} (not interp.) | coverage of 95% CI | rel. L2 @ ~350 evals "
        "| Spearman @ ~350 evals | top-3 overlap @ ~350 evals | additivity |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, s in summary.items():
    at = min(s["curve"], key=lambda c: abs(np.log(c["n_evals_median"] / 350)))
    speed = f"{captum_seconds / s['seconds_to_target_median']:.1f}x" if captum_seconds else "-"
    coverage = f"{s['coverage']:.3f}" if s["coverage"] is not None else "-"
    additivity = f"{s['additivity_median']:.4f}" if s.get("additivity_median") is not None else "-"
    print(f"| {_index_of(name)} | {name.split('/')[-1]} | {s['evals_to_target_median']:.1f} "
          f"({s['images_extrapolated']}) | {s['seconds_to_target_median']:.4f} | {speed} "
          f"| {s['evals_to_strict_target_median']:.0f} ({s['images_extrapolated_strict']}) | {coverage} "
          f"| {at['rel_l2_median']:.2e} | {at['spearman_median']:.3f} | {at['top3_mean']:.2f} | {additivity} |")
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
  fig.savefig(args.out / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
  main()
