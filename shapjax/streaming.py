"""Whole datasets: CPU segmentation of batch k + 1 while the devices attribute batch k.

:func:`attribute_dataset` reads images from an array or any iterable, segments them on the host's cores
(:func:`shapjax.segment_batch`), pads every batch to the same shape so one compiled program serves all of them,
and dispatches it (JAX returns before the devices finish), so the host prepares the next batch meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections.abc import Iterable

import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from shapjax import attribution, devices, masking, model, sampling, segmentation

DEFAULT_DATASET_BATCH = 16


@flax.struct.dataclass
class DatasetAttribution:
  """Attributions of a whole dataset, on the host.

  Attributes:
    result: :class:`shapjax.ShapleyResult` whose fields have a leading axis of size N (numpy arrays).
    labels: ``i32[N, H, W]`` the label maps the values refer to (paint them with :func:`shapjax.heatmap`).
  """

  result: sampling.ShapleyResult
  labels: np.ndarray

  @property
  def values(self) -> np.ndarray:
    """``f32[N, max_regions]`` Shapley value of each region of each image."""
    return self.result.values

  @property
  def stderr(self) -> np.ndarray:
    """``f32[N, max_regions]`` standard error of each value."""
    return self.result.stderr


def _chunks(items, size: int):
  """Yields lists of at most ``size`` images from an array or any iterable."""
  iterator = iter(items)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def attribute_dataset(
    params: model.AutoencoderParams,
    images: ArrayLike | Iterable[ArrayLike],
    n_perm: int = attribution.DEFAULT_N_PERM,
    *,
    key: jax.Array | None = None,
    batch: int = DEFAULT_DATASET_BATCH,
    max_regions: int = segmentation.DEFAULT_MAX_REGIONS,
    mesh: Mesh | None = None,
    progress: bool = True,
    baseline: str | float | ArrayLike = masking.DEFAULT_BASELINE,
    blur_sigma: float = masking.DEFAULT_BLUR_SIGMA,
    batch_size: int | None = None,
    estimator: str | None = None,
    index=sampling.DEFAULT_INDEX,
    n_workers: int | None = None,
    segment_options: dict | None = None,
) -> DatasetAttribution:
  """Segments and attributes every image of a dataset, one compiled program per batch of ``batch`` images.

  The last batch is padded with blank images, so every batch runs the same compiled program. With ``mesh`` the
  images of a batch are split across its devices (``batch`` is rounded up to a multiple of the device count).
  Image ``i`` of the dataset uses ``fold_in(key, i)``, so the values equal :func:`shapjax.attribute_batch` over
  the whole dataset, on one device or many.

  Several hosts: after ``jax.distributed.initialize()``, call this on every host with that host's own images,
  the same params and key, and a mesh over all devices; ``batch`` is then per host (rounded up to a multiple of
  the host's devices) and each host gets back its own images' values. Image ``i`` of host ``p`` in batch ``k``
  uses index ``k * batch * n_hosts + p * batch + i``, so with ``n_p <= batch`` images per host the values equal
  one process's over the hosts' images in host order. Hosts may hold different numbers of images: before each
  batch they agree whether any host has one left, and a host that has run out runs blank padding meanwhile.

  Args:
    params: autoencoder params.
    images: ``[N, H, W, C]`` (or ``[N, H, W]`` grey) array, or any iterable of ``[H, W(, C)]`` images of the
      model's shape (a generator reading files is fine: it is consumed one batch ahead).
    n_perm: permutations per image.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    batch: images per compiled program (per host).
    max_regions: SLIC's bound on regions per image, and the number of players.
    mesh: devices to split each batch across (with several hosts, every host's); None runs on the default
      device.
    progress: show a tqdm progress bar.
    baseline: as in :func:`shapjax.attribute` (``"blur"``, ``"mean"``, ``"zeros"``, a float, or one
      ``f32[H, W, C]`` array for all images).
    blur_sigma: Gaussian sigma for ``baseline="blur"``.
    batch_size: composites per autoencoder call (default: 16 on CPU, 64 elsewhere).
    estimator: as in :func:`shapjax.attribute` (None: the index's default).
    index: ``"shapley"`` (default), ``"banzhaf"``, ``"loo"`` or ``("beta", alpha, beta)``, as in
      :func:`shapjax.attribute`.
    n_workers: segmentation threads (default: the CPU count).
    segment_options: more arguments for :func:`shapjax.segment` (``n_segments``, ``compactness``, ``sigma``).

  Returns:
    :class:`DatasetAttribution` with ``result`` (values and stderr ``[N, max_regions]``) and ``labels``
    ``i32[N, H, W]``, all numpy.

  Example:
    >>> import jax, numpy as np, shapjax
    >>> params = shapjax.init_autoencoder((32, 32, 1), key=jax.random.key(0), features=(8, 16), latent_features=8)
    >>> images = np.random.default_rng(0).random((5, 32, 32), dtype=np.float32)
    >>> out = shapjax.attribute_dataset(params, images, 4, batch=4, max_regions=8, batch_size=8, progress=False)
    >>> out.values.shape, out.labels.shape
    ((5, 8), (5, 32, 32))
  """
  from tqdm.auto import tqdm  # only here: importing the library should not import tqdm

  if not isinstance(batch, (int, np.integer)) or batch < 1:
    raise ValueError(f"batch must be a positive int, got {batch!r}")
  batch = int(batch)
  if mesh is not None:
    mesh = devices.check_mesh(mesh)
    n_local = devices.local_size(mesh)  # this process's devices: all of the mesh's with one process
    batch = -(-batch // n_local) * n_local
  several = mesh is not None and jax.process_count() > 1
  key = attribution.default_key(key)
  segment_options = dict(segment_options or {})
  try:
    total = len(images)
  except TypeError:
    total = None

  seen_shapes = set()

  def prepare(chunk):
    """Host work for one batch: check (the front door), segment, pad."""
    arrays = [np.asarray(image) for image in chunk]
    shapes = {array.shape for array in arrays} | seen_shapes  # one shape across batches too
    seen_shapes.update(shapes)
    if len(shapes) > 1:
      raise ValueError(f"attribute_dataset needs images of one shape (the model's), got {sorted(shapes)}")
    stacked = np.stack(arrays)
    host = np.asarray(attribution.prepare(params, stacked, np.zeros(stacked.shape[:3], np.int32), n_perm,
                                          batched=True, max_regions=max_regions, batch_size=batch_size,
                                          estimator=estimator, index=index).images)
    labels = segmentation.segment_batch(host, max_regions=int(max_regions), n_workers=n_workers,
                                        **segment_options)
    return devices.pad_rows(host, batch), devices.pad_rows(labels, batch), len(chunk)

  def blank():
    """A batch of padding only: what a host that has run out of images runs while others still have some."""
    if template is None:  # no image at all on this host: its shape comes from the model
      shape = params.config.image_shape
      return np.zeros((batch, *shape), np.float32), np.zeros((batch, *shape[:2]), np.int32), 0
    return np.zeros_like(template[0]), np.zeros_like(template[1]), 0

  chunks = _chunks(images, batch)
  collected, all_labels = [], []
  options = baseline_array = template = None
  if mesh is not None:
    params, key = devices.replicate((params, key), mesh)
  bar = tqdm(total=total, unit="img", desc="attribute", disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    nxt = pool.submit(lambda: next((prepare(chunk) for chunk in chunks), None))
    offset = 0
    while True:
      prepared = nxt.result()
      # Several hosts run each batch's program together: go on while any of them has images left.
      if several and devices.process_counts(int(prepared is not None)).any():
        prepared = prepared or blank()
      if prepared is None:
        break
      host, labels, n_real = prepared
      template = template or (host, labels)
      if options is None:  # the baseline and options, checked once against the first image
        first = attribution.prepare(params, host[0], labels[0], n_perm, baseline=baseline, blur_sigma=blur_sigma,
                                    max_regions=max_regions, batch_size=batch_size, estimator=estimator,
                                    index=index)
        options, baseline_array = first.options, first.baseline
        if mesh is not None and baseline_array is not None:
          baseline_array = devices.replicate(baseline_array, mesh)
      # Several hosts: this host's rows start after those of the hosts before it.
      first_row = offset if mesh is None else offset * jax.process_count() + jax.process_index() * batch
      result = attribution.run_images(params, host, labels, key, offset=first_row, baseline_array=baseline_array,
                                      options=options, mesh=mesh)  # asynchronous
      nxt = pool.submit(lambda: next((prepare(chunk) for chunk in chunks), None))  # overlaps the device work
      result = jax.tree.map(lambda x: devices.local_rows(x)[:n_real], result)  # blocks on batch k
      collected.append(result)
      all_labels.append(labels[:n_real])
      bar.update(n_real)
      offset += batch
  bar.close()
  collected = [result for result, labels in zip(collected, all_labels) if len(labels)]
  all_labels = [labels for labels in all_labels if len(labels)]
  if not collected:
    raise ValueError("attribute_dataset got no images")
  result = jax.tree.map(lambda *xs: np.concatenate(xs), *collected)
  return DatasetAttribution(result=result, labels=np.concatenate(all_labels))
