"""attribute_dataset over an MVTec-layout test split: batched programs, and how much CPU segmentation overlaps.

    .venv/bin/python benchmarks/dataset.py --root ../shared/data/magnetic_tile
    .venv/bin/python benchmarks/dataset.py --root DATA --size 64 --batch 16 --devices 4   # 4 fake CPU devices

Three timings over the same images, after a warm-up batch that compiles the program:

* ``segment``: ``shapjax.segment_batch`` on all images (host CPU only);
* ``attribute``: ``attribute_batch`` on the pre-segmented batches (device only), batch by batch;
* ``pipeline``: ``shapjax.attribute_dataset`` end to end (segmentation of batch k + 1 overlapping the device
  work on batch k).

``pipeline < segment + attribute`` means the overlap works. On a CPU-only machine the "device" is the same
cores, so the overlap is bounded; on a GPU or TPU the segmentation hides behind the device work.
The autoencoder is trained briefly on the train split (``--steps``). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="MVTec-layout dataset folder")
  parser.add_argument("--size", type=int, default=64, help="images are resized to size x size")
  parser.add_argument("--batch", type=int, default=16, help="images per compiled program")
  parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT test images")
  parser.add_argument("--regions", type=int, default=32, help="max_regions")
  parser.add_argument("--n-perm", type=int, default=8, help="permutations per image")
  parser.add_argument("--steps", type=int, default=300, help="training steps")
  parser.add_argument("--devices", type=int, default=None, help="fake CPU devices for a mesh (None: no mesh)")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "dataset.json"))
  args = parser.parse_args()
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  import jax
  import numpy as np

  import shapjax
  from benchmarks.report import write_json

  train = shapjax.load_mvtec(args.root, split="train", image_size=args.size)
  test = shapjax.load_mvtec(args.root, split="test", image_size=args.size)
  images = test.images[:args.limit]
  config = shapjax.TrainConfig(model=shapjax.AutoencoderConfig(image_shape=train.images.shape[1:],
                                                               features=(16, 32, 64), latent_features=16),
                               steps=args.steps, batch_size=16)
  params = shapjax.train(config, train.images, key=jax.random.key(0), progress=False)
  mesh = shapjax.make_mesh() if args.devices else None
  options = dict(max_regions=args.regions, key=jax.random.key(1))
  batch = args.batch if mesh is None else -(-args.batch // mesh.size) * mesh.size

  start = time.perf_counter()  # warm-up: compiles the batch program
  shapjax.attribute_dataset(params, images[:batch], args.n_perm, batch=batch, mesh=mesh, progress=False, **options)
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  labels = shapjax.segment_batch(images, max_regions=args.regions)
  segment_s = time.perf_counter() - start

  start = time.perf_counter()
  for first in range(0, len(images), batch):
    chunk = np.zeros((batch, *images.shape[1:]), np.float32)
    chunk_labels = np.zeros((batch, *labels.shape[1:]), np.int32)
    n = min(batch, len(images) - first)
    chunk[:n], chunk_labels[:n] = images[first:first + n], labels[first:first + n]
    jax.block_until_ready(shapjax.attribute_batch(params, chunk, chunk_labels, args.n_perm, mesh=mesh, **options))
  attribute_s = time.perf_counter() - start

  start = time.perf_counter()
  out = shapjax.attribute_dataset(params, images, args.n_perm, batch=batch, mesh=mesh, progress=True, **options)
  pipeline_s = time.perf_counter() - start
  top = out.values.argmax(axis=1)
  hit = [bool(test.masks[i][out.labels[i] == top[i]].mean() > 0.5) for i in range(len(images))
         if test.defect_types[i] != "good"]

  row = {"images": len(images), "size": args.size, "batch": batch, "devices": mesh.size if mesh else 1,
         "n_perm": args.n_perm, "max_regions": args.regions, "compile_s": compile_s, "segment_s": segment_s,
         "attribute_s": attribute_s, "pipeline_s": pipeline_s, "images_per_s": len(images) / pipeline_s,
         "top_region_mostly_defect": float(np.mean(hit)) if hit else None, "cpu_count": os.cpu_count(),
         "backend": jax.default_backend()}
  print(f"\n{args.root}: {len(images)} test images at {args.size}x{args.size}, batch {batch}, "
        f"{row['devices']} device(s), n_perm {args.n_perm}, max_regions {args.regions}\n")
  print("| compile (s) | segment only (s) | attribute only (s) | sum (s) | pipeline (s) | images/s |")
  print("|---:|---:|---:|---:|---:|---:|")
  print(f"| {compile_s:.1f} | {segment_s:.1f} | {attribute_s:.1f} | {segment_s + attribute_s:.1f} | "
        f"{pipeline_s:.1f} | {row['images_per_s']:.1f} |")
  write_json(row, args.out)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
