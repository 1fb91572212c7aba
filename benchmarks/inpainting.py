"""The inpainting game against the autoencoder's residual: every attempt of docs/localization.md in one command.

For one dataset in the MVTec AD layout this script trains (unless their checkpoints are already in ``--work``)
the reference autoencoder, an inpainter, an inpainter that also sees a low-resolution copy of the image
(``--context lowres``), one trained for twice the steps, one with SSIM and gradient-magnitude loss terms and one
with 1.5x the channels, all at one image size, data parallel over 2 CPU devices (``--devices 2``) and with
the CLI's defaults otherwise, then
scores every map of every attempt with ``shapjax.evaluate`` on the test split and writes one table:

* the autoencoder: ``residual`` (the map to beat), the seed's reconstruction game ``shapley``, and its control
  ``pooled_residual``;
* the inpainter at 32 regions: the controls ``inpaint_grid`` and ``inpaint_loo``; the game maps of four
  semivalues (Shapley; Banzhaf; Beta(16, 1), which weights small coalitions of visible regions; Beta(1, 16), which
  weights near-full ones, the leave-one-out end); the grid map gated by each game map and, for the gates, the
  ``:constant`` and ``:shuffled`` ablations;
* the inpainter at 64 regions, and at two SLIC scales (32 and 64, averaged);
* the low-resolution-context inpainter at 32 regions;
* an inpainter trained for twice the steps;
* an inpainter trained with SSIM and gradient-magnitude loss terms (``--ssim-weight 1 --gms-weight 1``, RIAD's
  choice of terms) besides the squared error;
* an inpainter with 1.5x the channels (``--features 24,48,96,192``).

Each attempt's per-image parts are cached in ``--work``, so a rerun (or a run with more maps) only computes what
is missing. Results: ``OUT/<dataset>.json`` (every map's metrics, seconds per image and the median additivity of
the game per attempt) and ``OUT/<dataset>.md`` (``<dataset>-subset<K>`` with ``--limit K``). ``--maps``
restricts every attempt to some of its maps (the cache keeps them, so a later run adds the rest).

    python -m benchmarks.inpainting ../shared/data/kolektor_sdd --image-size 160 64 \\
        --work ../inpainting-work --out benchmarks/results/inpainting
    python -m benchmarks.inpainting ../shared/data/magnetic_tile --image-size 128 112 \\
        --work ../inpainting-work --out benchmarks/results/inpainting
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEMIVALUES = ("shapley", "banzhaf", "beta_16_1", "beta_1_16")
GATES = ("shapley", "banzhaf", "beta_1_16", "loo")


def attempts() -> list[dict]:
  """Every attempt: a name, the checkpoint it uses, its SLIC scales and its maps."""
  games = [f"inpaint_{s}" for s in SEMIVALUES]
  gated = [f"inpaint_grid_x_{g}" for g in GATES]
  ablations = [f"{m}:{a}" for m in ("inpaint_grid_x_banzhaf", "inpaint_banzhaf") for a in ("constant", "shuffled")]
  return [
      {"id": "autoencoder", "name": "autoencoder", "checkpoint": "autoencoder", "regions": (32,),
       "maps": ("residual", "shapley", "pooled_residual")},
      {"id": "inpainter", "name": "inpainter", "checkpoint": "inpainter", "regions": (32,),
       "maps": ("inpaint_grid", "inpaint_loo", *games, *gated, *ablations)},
      {"id": "regions64", "name": "inpainter, 64 regions", "checkpoint": "inpainter", "regions": (64,),
       "maps": ("inpaint_loo", "inpaint_banzhaf", "inpaint_grid_x_banzhaf")},
      {"id": "scales", "name": "inpainter, 32+64 regions", "checkpoint": "inpainter", "regions": (32, 64),
       "maps": ("inpaint_loo", "inpaint_banzhaf", "inpaint_grid_x_banzhaf")},
      {"id": "lowres", "name": "inpainter, lowres context", "checkpoint": "inpainter_lowres", "regions": (32,),
       "maps": ("inpaint_grid", "inpaint_loo", "inpaint_shapley", "inpaint_banzhaf", "inpaint_beta_1_16",
                "inpaint_grid_x_banzhaf")},
      {"id": "longer", "name": "inpainter, twice the training", "checkpoint": "inpainter_long", "regions": (32,),
       "maps": ("inpaint_grid", "inpaint_loo", "inpaint_banzhaf", "inpaint_beta_1_16", "inpaint_grid_x_loo",
                "inpaint_grid_x_beta_1_16")},
      {"id": "structural", "name": "inpainter, SSIM + GMS loss", "checkpoint": "inpainter_structural",
       "regions": (32,),
       "maps": ("inpaint_grid", "inpaint_loo", "inpaint_shapley", "inpaint_banzhaf", "inpaint_beta_1_16",
                "inpaint_grid_x_banzhaf", "inpaint_grid_x_loo")},
      {"id": "wider", "name": "inpainter, 1.5x the channels", "checkpoint": "inpainter_wide", "regions": (32,),
       "maps": ("inpaint_grid", "inpaint_loo", "inpaint_shapley", "inpaint_banzhaf", "inpaint_beta_1_16",
                "inpaint_grid_x_banzhaf", "inpaint_grid_x_loo")},
  ]


def train_commands(data: Path, work: Path, size: tuple[int, int], steps_autoencoder: int,
                   steps_inpainter: int) -> dict[str, list[str]]:
  """The ``shapjax train`` command of each checkpoint."""
  common = [str(data), "--image-size", *map(str, size), "--devices", "2", "--quiet"]
  return {
      "autoencoder": ["train", *common, "--out", str(work / "autoencoder"), "--steps", str(steps_autoencoder),
                      "--features", "8,16,32,64", "--latent-features", "16"],
      "inpainter": ["train", *common, "--out", str(work / "inpainter"), "--model", "inpainting",
                    "--steps", str(steps_inpainter)],
      "inpainter_lowres": ["train", *common, "--out", str(work / "inpainter_lowres"), "--model", "inpainting",
                           "--context", "lowres", "--steps", str(steps_inpainter)],
      "inpainter_long": ["train", *common, "--out", str(work / "inpainter_long"), "--model", "inpainting",
                         "--steps", str(2 * steps_inpainter)],
      "inpainter_structural": ["train", *common, "--out", str(work / "inpainter_structural"), "--model",
                               "inpainting", "--ssim-weight", "1", "--gms-weight", "1", "--steps",
                               str(steps_inpainter)],
      "inpainter_wide": ["train", *common, "--out", str(work / "inpainter_wide"), "--model", "inpainting",
                         "--features", "24,48,96,192", "--steps", str(steps_inpainter)],
  }


def _median(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.median(values)) if values else None


def run_attempt(attempt: dict, params, reference, data: Path, *, n_perm: int, limit: int | None,
                cache: Path) -> dict:
  import shapjax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  maps = list(attempt["maps"])
  if reference is not None:
    maps.append("residual")
  result = shapjax.evaluate(params, data, maps=maps, n_perm=n_perm, regions=attempt["regions"], limit=limit,
                            cache_dir=cache, reference=reference, progress=False)
  additivity = _median(image["additivity"][0] if image["additivity"] else None for image in result["images"])
  return {"name": attempt["name"], "regions": list(attempt["regions"]), "n_images": result["n_images"],
          "seconds": time.perf_counter() - start, "cached_images": result["cached_images"],
          "additivity_median": additivity, "additivity_index": result["additivity_index"], "maps": result["maps"]}


def markdown(record: dict) -> str:
  def fmt(x):
    return "-" if x is None else f"{x:.3f}"

  lines = [f"### {record['dataset']} ({record['n_images']} test images at {record['image_size'][0]}x"
           f"{record['image_size'][1]}, n_perm {record['n_perm']})", "",
           f"Command: `{record['command']}`", "",
           "| attempt | map | image AUROC | pixel AUROC | AUPRO@0.3 | s / image | additivity (median) |",
           "|---|---|---|---|---|---|---|"]
  for attempt in record["attempts"]:
    for name, scores in attempt["maps"].items():
      if name == "residual" and attempt["name"] != "autoencoder":
        continue  # the reference's residual, the same map as the autoencoder attempt's
      overall = scores["overall"]
      game = name not in ("residual", "pooled_residual", "inpaint_grid")
      lines.append(f"| {attempt['name']} | {name} | {fmt(overall['image_auroc'])} | {fmt(overall['pixel_auroc'])} | "
                   f"{fmt(overall['aupro'])} | {scores['seconds_per_image']:.2f} | "
                   f"{fmt(attempt['additivity_median']) if game else '-'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("data", type=Path, help="dataset folder in the MVTec AD layout")
  parser.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"))
  parser.add_argument("--work", type=Path, required=True, help="checkpoints and per-image caches (created)")
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inpainting"))
  parser.add_argument("--n-perm", type=int, default=8)
  parser.add_argument("--limit", type=int, default=None, help="a stratified subset of about K test images")
  parser.add_argument("--steps-autoencoder", type=int, default=1000)
  parser.add_argument("--steps-inpainter", type=int, default=1500)
  parser.add_argument("--attempts", default="", help="comma-separated attempts to run, of autoencoder, inpainter, "
                      "regions64, scales, lowres, longer, structural, wider (default: all)")
  parser.add_argument("--maps", default="", help="comma-separated maps: each attempt scores only those of its maps "
                      "(default: all of them)")
  args = parser.parse_args(argv)

  import shapjax  # pylint: disable=g-import-not-at-top

  dataset = args.data.name
  work = args.work / dataset
  commands = train_commands(args.data, work, tuple(args.image_size), args.steps_autoencoder, args.steps_inpainter)
  chosen = [a for a in attempts() if not args.attempts or a["id"] in args.attempts.split(",")]
  if args.maps:
    wanted = args.maps.split(",")
    chosen = [dict(a, maps=tuple(m for m in a["maps"] if m in wanted)) for a in chosen]
    chosen = [a for a in chosen if a["maps"]]
    if not chosen:
      parser.error(f"no chosen attempt has any of the maps {wanted}")
  training = {}
  for checkpoint in dict.fromkeys(["autoencoder", *(a["checkpoint"] for a in chosen)]):
    if not (work / checkpoint).is_dir():
      start = time.perf_counter()
      print("shapjax", " ".join(commands[checkpoint]), flush=True)
      subprocess.run([sys.executable, "-m", "shapjax", *commands[checkpoint]], check=True)
      training[checkpoint] = time.perf_counter() - start
  reference = shapjax.load(work / "autoencoder")
  record = {"dataset": dataset, "image_size": list(args.image_size), "n_perm": args.n_perm, "limit": args.limit,
            "command": " ".join(["python -m benchmarks.inpainting", str(args.data), "--image-size",
                                 *map(str, args.image_size), "--work", str(args.work), "--out", str(args.out)]
                                + (["--limit", str(args.limit)] if args.limit else [])),
            "train_commands": {k: "shapjax " + " ".join(v) for k, v in commands.items()},
            "train_seconds": training, "attempts": []}
  args.out.mkdir(parents=True, exist_ok=True)
  # The whole test split and a subset are separate tables.
  stem = dataset if args.limit is None else f"{dataset}-subset{args.limit}"
  results_path = args.out / f"{stem}.json"
  # Attempts run before with the same settings stay in the table (a run with --attempts adds or replaces).
  earlier = json.loads(results_path.read_text()) if results_path.is_file() else {}
  same = all(earlier.get(k) == record[k] for k in ("image_size", "n_perm", "limit"))
  kept = [a for a in earlier.get("attempts", []) if same and a["name"] not in {c["name"] for c in chosen}]
  earlier_maps = {a["name"]: a["maps"] for a in earlier.get("attempts", [])} if same else {}
  for attempt in chosen:
    params = reference if attempt["checkpoint"] == "autoencoder" else shapjax.load(work / attempt["checkpoint"])
    print(f"{dataset}: {attempt['name']} ...", flush=True)
    result = run_attempt(attempt, params, None if params is reference else reference, args.data,
                         n_perm=args.n_perm, limit=args.limit, cache=work / "cache" / attempt["checkpoint"])
    # Maps of this attempt scored before (and not now, with --maps) stay in its row.
    result["maps"] = {**earlier_maps.get(attempt["name"], {}), **result["maps"]}
    record["attempts"].append(result)
    record["n_images"] = record["attempts"][-1]["n_images"]
    order = {a["name"]: i for i, a in enumerate(attempts())}
    merged = dict(record, attempts=sorted(kept + record["attempts"], key=lambda a: order.get(a["name"], 99)))
    results_path.write_text(json.dumps(merged, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(merged))
  print(markdown(merged))


if __name__ == "__main__":
  main()
