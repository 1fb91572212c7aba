"""Localization benchmark: residual map against Shapley maps, on every MVTec-layout dataset under a folder.

For each dataset folder (one holding ``train/good`` and ``test``) this trains an autoencoder (or loads the one
already saved in ``--checkpoints/<name>``), evaluates the anomaly maps on the test split with
:func:`shapjax.evaluate` (per-image parts cached, so an interrupted run resumes), and writes
``<out>/<name>.json`` and one markdown file ``<out>/localization.md`` with the tables and the command.

Images are resized to about ``--pixels`` pixels, keeping the median aspect ratio of the training images
(rounded to multiples of the model's stride), so long narrow parts are not squashed.

    python -m benchmarks.localization ../shared/data --out benchmarks/results/localization \\
        --checkpoints /tmp/shapjax_ckpt --cache /tmp/shapjax_cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import shapjax
from shapjax import data as data_lib
from shapjax import evaluation

ABLATION_MAPS = ("residual_x_shapley:constant", "residual_x_shapley:shuffled", "residual_x_shapley_norm:constant",
                 "residual_x_shapley_norm:shuffled", "shapley_area:constant", "shapley_area:shuffled",
                 *evaluation.POOLED_MAPS)


def image_size_for(root: Path, *, pixels: int, stride: int) -> tuple[int, int]:
  """``(H, W)`` with about ``pixels`` pixels and the median aspect ratio of ``root/train/good``."""
  files = data_lib._list_images(root / "train" / "good")  # pylint: disable=protected-access
  ratios = []
  for path in files:
    with Image.open(path) as image:
      width, height = image.size
    ratios.append(height / width)
  ratio = float(np.median(ratios))
  height = max(stride, int(round(np.sqrt(pixels * ratio) / stride)) * stride)
  width = max(stride, int(round(np.sqrt(pixels / ratio) / stride)) * stride)
  return height, width


def datasets_under(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if (p / "train" / "good").is_dir() and (p / "test").is_dir())


def trained_model(root: Path, checkpoint: Path, args) -> shapjax.AutoencoderParams:
  if checkpoint.exists():
    return shapjax.load(checkpoint)
  features = tuple(int(f) for f in args.features.split(","))
  height, width = image_size_for(root, pixels=args.pixels, stride=2 ** len(features))
  train = shapjax.load_mvtec(root, split="train", image_size=(height, width))
  config = shapjax.TrainConfig(
      model=shapjax.AutoencoderConfig(image_shape=train.images.shape[1:], features=features,
                                      latent_features=args.latent_features, bottleneck=args.bottleneck),
      steps=args.steps, checkpoint_every=max(50, args.steps // 4))
  return shapjax.train(config, train.images, key=jax.random.key(args.seed), checkpoint_dir=checkpoint,
                       resume=True, progress=not args.quiet)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("data", type=Path, help="folder of MVTec-layout datasets")
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/localization"))
  parser.add_argument("--checkpoints", type=Path, required=True, help="one checkpoint folder per dataset")
  parser.add_argument("--cache", type=Path, default=None, help="per-image cache of evaluate()")
  parser.add_argument("--datasets", default=None, help="comma-separated subset of dataset names")
  parser.add_argument("--pixels", type=int, default=128 * 112, help="model input size in pixels")
  parser.add_argument("--features", default="8,16,32,64")
  parser.add_argument("--latent-features", type=int, default=16)
  parser.add_argument("--bottleneck", default="conv", choices=("conv", "dense"))
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--maps", default=",".join(evaluation.DEFAULT_MAPS + ABLATION_MAPS))
  parser.add_argument("--n-perm", type=int, default=evaluation.DEFAULT_N_PERM)
  parser.add_argument("--regions", default=",".join(str(r) for r in evaluation.DEFAULT_REGIONS))
  parser.add_argument("--baseline", default=evaluation.DEFAULT_BASELINE)
  parser.add_argument("--limit", type=int, default=None, help="stratified subset per dataset (quick runs)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)

  roots = datasets_under(args.data)
  if args.datasets:
    wanted = set(args.datasets.split(","))
    roots = [r for r in roots if r.name in wanted]
  if not roots:
    parser.error(f"no MVTec-layout datasets under {args.data}")
  args.out.mkdir(parents=True, exist_ok=True)
  command = "python -m benchmarks.localization " + " ".join(sys.argv[1:] if argv is None else argv)
  for root in roots:
    started = time.perf_counter()
    params = trained_model(root, args.checkpoints / root.name, args)
    train_seconds = time.perf_counter() - started
    result = shapjax.evaluate(
        params, root, maps=args.maps.split(","), n_perm=args.n_perm,
        regions=tuple(int(r) for r in args.regions.split(",")), baseline=args.baseline, seed=args.seed,
        limit=args.limit, cache_dir=None if args.cache is None else args.cache / root.name,
        figures_dir=args.out / root.name, progress=not args.quiet)
    result["dataset"] = root.name
    result["train_or_load_seconds"] = train_seconds
    evaluation.write_json(result, args.out / f"{root.name}.json")
    height, width, _ = params.config.image_shape
    table = evaluation.format_table(result)
    print(f"## {root.name}\n\n{table}", flush=True)
    (args.out / f"{root.name}.md").write_text(
        f"### {root.name} (model input {height}x{width}, features {params.config.features}, "
        f"{result['n_images']} test images)\n\nCommand: `{command}`\n\n{table}")
  # One file for the README: every dataset evaluated so far (runs may be split by --datasets).
  sections = [p.read_text() for p in sorted(args.out.glob("*.md")) if p.name != "localization.md"]
  (args.out / "localization.md").write_text("\n".join(sections))
  print(json.dumps({"written": str(args.out / "localization.md")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
