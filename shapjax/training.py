"""Training a model on defect-free images: optax Adam with a warm-up + cosine schedule.

The model is the autoencoder (an :class:`shapjax.AutoencoderConfig`: reconstruct each image) or the inpainter
(an :class:`shapjax.InpainterConfig`: fill random holes of each image, drawn per step). The loop is the same;
only the batch and the loss differ (:func:`_training_batch`, :func:`_loss_and_grads`).

One linear loop. The training step is a plain ``jit``-compiled function of pytrees ``(weights, opt_state,
images, key, step)``; the whole image set lives on the device and each step draws its batch (and its flips
and shifts) from ``fold_in(key, step)``. A run is therefore a pure function of ``(config, images, key)``, and
resuming from the checkpoint of step ``k`` replays steps ``k, k+1, ...`` exactly as the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from shapjax import checkpoint, devices, inpainting, model, pixels

_SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train a model (frozen and hashable).

  Attributes:
    model: the :class:`shapjax.AutoencoderConfig` (train an autoencoder) or :class:`shapjax.InpainterConfig`
      (train an inpainter); ``None`` builds the default autoencoder for the images' shape.
    steps: optimizer steps in total.
    batch_size: images per step, drawn with replacement.
    learning_rate: peak Adam learning rate.
    warmup_steps: linear warm-up from 0 to the peak.
    schedule: ``"cosine"`` (decay to ``end_learning_rate_fraction`` of the peak at ``steps``) or ``"constant"``.
    end_learning_rate_fraction: final learning rate of the cosine schedule, as a fraction of the peak.
    flips: random horizontal and vertical flips (right for textures and most surfaces; not for oriented objects).
    max_shift: random shifts of up to this many pixels in each direction (reflected borders); 0 turns it off.
    checkpoint_every: save every this many steps (and always at the end) when a checkpoint folder is given.
    keep_checkpoints: how many of the latest checkpoints to keep.
    seed: seed of the default PRNG key, used when :func:`train` gets no ``key``.
  """

  model: model.ModelConfig | None = None
  steps: int = 1000
  batch_size: int = 32
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  schedule: str = "cosine"
  end_learning_rate_fraction: float = 0.05
  flips: bool = True
  max_shift: int = 4
  checkpoint_every: int = 250
  keep_checkpoints: int = 3
  seed: int = 0

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
    if self.warmup_steps < 0 or self.max_shift < 0:
      raise ValueError("warmup_steps and max_shift must be >= 0")
    if self.schedule not in _SCHEDULES:
      raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
    if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
      raise ValueError("checkpoint_every and keep_checkpoints must be >= 1")

  @classmethod
  def tiny(cls, image_shape: tuple[int, int, int] = (32, 32, 1), **overrides) -> "TrainConfig":
    """A few steps of a very small model: for tests and smoke runs (seconds on a CPU)."""
    options = dict(model=model.AutoencoderConfig.tiny(tuple(image_shape)), steps=20, batch_size=8,
                   learning_rate=5e-3, warmup_steps=2, max_shift=2, checkpoint_every=10, keep_checkpoints=2)
    options.update(overrides)
    return cls(**options)

  def with_model(self, image_shape: tuple[int, int, int]) -> "TrainConfig":
    """This config with ``model`` filled in (the default architecture) for images of ``image_shape``."""
    if self.model is not None:
      return self
    return dataclasses.replace(self, model=model.AutoencoderConfig(image_shape=tuple(image_shape)))

  def to_dict(self) -> dict:
    """A JSON-ready dict (``from_dict`` inverts it); ``model_kind`` says which model ``model`` describes."""
    data = dataclasses.asdict(self)
    data["model"] = None if self.model is None else self.model.to_dict()
    if self.model is not None:
      data["model_kind"] = model.model_kind(self.model)
    return data

  @classmethod
  def from_dict(cls, data: dict) -> "TrainConfig":
    """The inverse of :meth:`to_dict`; a dict without ``model_kind`` describes an autoencoder."""
    data = dict(data)
    kind = data.pop("model_kind", "autoencoder")
    if data.get("model") is not None:
      data["model"] = model.config_from_dict(data["model"], kind=kind)
    return cls(**data)


def learning_rates(config: TrainConfig) -> np.ndarray:
  """The learning rate of each step, ``f32[steps]``: linear warm-up from 0, then cosine decay or constant.

  The same curve as ``optax.warmup_cosine_decay_schedule(0, lr, warmup, steps, lr * end_fraction)``, computed
  on the host: the rate enters the compiled step as an argument, so runs that differ only in their schedule
  (steps, learning rate, warm-up) share one compiled step.
  """
  steps = np.arange(config.steps, dtype=np.float64)
  peak = config.learning_rate
  warmup = min(config.warmup_steps, config.steps - 1)
  if config.schedule == "constant":
    after = np.full_like(steps, peak)
  else:
    end = peak * config.end_learning_rate_fraction
    progress = np.clip((steps - warmup) / max(config.steps - warmup, 1), 0.0, 1.0)
    after = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * progress))
  rates = np.where(steps < warmup, peak * steps / max(warmup, 1), after)
  return rates.astype(np.float32)


def _optimizer() -> optax.GradientTransformation:
  """Adam's moment estimates; the step multiplies them by ``-learning_rate`` (Adam = this + a schedule)."""
  return optax.scale_by_adam()


def augment(images: jax.Array, key: jax.Array, *, flips: bool, max_shift: int) -> jax.Array:
  """Random flips and shifts of a batch, each image its own.

  Args:
    images: ``f32[B, H, W, C]``.
    key: PRNG key.
    flips: flip each image left-right and up-down with probability 1/2 each.
    max_shift: shift by up to this many pixels in each direction, with reflected borders.

  Returns:
    ``f32[B, H, W, C]``.
  """
  batch, height, width, _ = images.shape
  flip_key, shift_key = jax.random.split(key)
  if flips:
    lr, ud = jax.random.bernoulli(flip_key, 0.5, (2, batch))
    images = jnp.where(lr[:, None, None, None], images[:, :, ::-1], images)
    images = jnp.where(ud[:, None, None, None], images[:, ::-1], images)
  if max_shift > 0:
    shift = min(max_shift, height - 1, width - 1)
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * shift + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))

    images = jax.vmap(crop)(padded, offsets)
  return images


# Step t's holes come from this fold of its key (batch and augmentation split it as before inpainters existed,
# so an autoencoder run draws the same batches as it always did).
_MASK_STREAM = 1


def _training_batch(model_config: model.ModelConfig, images: jax.Array, step_key: jax.Array):
  """What the loss takes: the (augmented) images for the autoencoder; ``(images, bool[B, H, W] visible)`` for
  the inpainter, its holes drawn from ``fold_in(step_key, 1)``."""
  if model.model_kind(model_config) != "inpainting":
    return images
  mask_key = jax.random.fold_in(step_key, _MASK_STREAM)
  return images, inpainting.random_visible_masks(model_config, images.shape[0], key=mask_key)


def _loss_and_grads(model_config: model.ModelConfig, mesh=None):
  """``(weights, batch) -> (mean loss, its gradient)``, traceable.

  The autoencoder's batch is ``f32[B, H, W, C]`` and its loss :func:`shapjax.reconstruction_loss`; the
  inpainter's is ``(f32[B, H, W, C], bool[B, H, W])`` and its loss :func:`shapjax.inpainting_loss`. Both are
  means over the batch of per-image losses.

  With a ``mesh``, data parallel: each device differentiates its own share of the batch and the results are
  averaged across devices (:func:`shapjax.devices.batch_mean`).
  """
  if model.model_kind(model_config) == "inpainting":
    def batch_loss(params, batch):
      return inpainting.inpainting_loss(params, *batch)
  else:
    batch_loss = model.reconstruction_loss

  def loss_and_grads(weights, batch):
    def loss_fn(w):
      return jnp.mean(batch_loss(model.make_params(model_config, w), batch))
    return jax.value_and_grad(loss_fn)(weights)

  if mesh is None:
    return loss_and_grads
  return devices.batch_mean(loss_and_grads, mesh)


def _train_step(weights, opt_state, images, key, step, learning_rate, *, model_config, batch_size, flips,
                max_shift, mesh=None):
  """One Adam step on the batch that ``fold_in(key, step)`` draws. Returns (weights, opt_state, loss).

  With a ``mesh`` the batch is split across its devices (data parallel: each device computes the loss and
  gradients of its share, averaged across devices); the weights and the images are replicated.
  """
  step_key = jax.random.fold_in(key, step)
  batch_key, augment_key = jax.random.split(step_key)
  index = jax.random.randint(batch_key, (batch_size,), 0, images.shape[0])
  batch = augment(images[index], augment_key, flips=flips, max_shift=max_shift)
  batch = _training_batch(model_config, batch, step_key)

  loss, grads = _loss_and_grads(model_config, mesh)(weights, batch)
  updates, opt_state = _optimizer().update(grads, opt_state, weights)
  weights = jax.tree.map(lambda w, u: w - learning_rate * u, weights, updates)
  return weights, opt_state, loss


@functools.lru_cache(maxsize=8)
def _step_function(model_config: model.ModelConfig, batch_size: int, flips: bool, max_shift: int,
                   mesh=None):
  """The jitted step, cached: repeated, resumed and re-scheduled runs compile it once per image shape."""
  return jax.jit(functools.partial(_train_step, model_config=model_config, batch_size=batch_size, flips=flips,
                                   max_shift=max_shift, mesh=mesh))


def _as_images(images: ArrayLike) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must have shape [N, H, W, C], got shape {images.shape}")
  if images.shape[0] < 1:
    raise ValueError("images is empty")
  return pixels.as_float(images, what="images")


def _key_record(key: jax.Array) -> list:
  return np.asarray(jax.random.key_data(key)).ravel().tolist()


def train(
    config: TrainConfig,
    images: ArrayLike,
    *,
    key: jax.Array | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> model.ModelParams:
  """Trains an autoencoder to reconstruct defect-free images, or an inpainter to fill holes in them.

  ``config.model`` chooses: an :class:`shapjax.AutoencoderConfig` (or ``None``) trains an autoencoder on the
  mean squared reconstruction error, an :class:`shapjax.InpainterConfig` an inpainter on the squared error of
  the hidden pixels (:func:`shapjax.inpainting_loss`), with holes from :func:`shapjax.random_visible_masks`.
  Adam with :func:`learning_rates`. Step ``t`` draws its batch, augmentation and holes from ``fold_in(key, t)``,
  so the same ``config``, ``images`` and ``key`` give the
  same params, and ``resume=True`` after an interruption gives the params of an uninterrupted run.

  With ``checkpoint_dir``, the state is saved every ``config.checkpoint_every`` steps and at the end (the last
  ``config.keep_checkpoints`` are kept); each is a checkpoint :func:`shapjax.load` reads. A loss curve is
  written to ``checkpoint_dir/loss.png`` (and the per-step losses to ``loss.json``) at the end.

  Args:
    config: :class:`TrainConfig`.
    images: ``f32[N, H, W, C]`` in ``[0, 1]`` (or uint8), defect-free only. They are kept on the device.
    key: PRNG key for the initial weights and the batches; defaults to ``jax.random.key(config.seed)``.
    checkpoint_dir: folder for checkpoints and the loss curve; ``None`` saves nothing.
    resume: continue from the latest checkpoint in ``checkpoint_dir`` (start afresh when there is none).
    progress: show a progress bar with the loss.
    mesh: data parallel over its devices (e.g. ``shapjax.make_mesh()``, after :func:`shapjax.use_cpu_devices`
      on a CPU): each device takes ``batch_size / devices`` images of every batch and the gradients are averaged
      across devices. The batches are the same as on one device, so the params agree to float tolerance.
      On 2 CPU cores the mesh ran 1.1-1.3x the steps of one device, which already spreads its matrix products
      over both cores (``benchmarks/contention.py`` tells how a machine's cores scale). Several hosts (after
      ``jax.distributed.initialize()``, a mesh over every host's devices): every host passes the same
      ``images``, ``key`` and ``config`` (checked) and gets the same params, equal to one process's.

  Returns:
    :class:`shapjax.AutoencoderParams` (or :class:`shapjax.InpainterParams`) after ``config.steps`` steps, on the
    default device.

  Raises:
    ValueError: for images that do not fit the model, a ``checkpoint_dir`` that already holds checkpoints
      when ``resume`` is False, or a checkpoint that does not match this run.

  Example:
    >>> import jax, numpy as np, shapjax
    >>> images = np.random.default_rng(0).random((16, 32, 32, 1), dtype=np.float32)
    >>> config = shapjax.TrainConfig.tiny((32, 32, 1), steps=3)
    >>> params = shapjax.train(config, images, key=jax.random.key(0), progress=False)
    >>> params.config.image_shape
    (32, 32, 1)
  """
  images = _as_images(images)
  config = config.with_model(images.shape[1:])
  if mesh is not None:
    mesh = devices.check_mesh(mesh)
    if config.batch_size % mesh.size:
      raise ValueError(f"with a mesh of {mesh.size} devices, batch_size must be a multiple of {mesh.size}, got "
                       f"{config.batch_size}")
  if tuple(images.shape[1:]) != tuple(config.model.image_shape):
    raise ValueError(f"images have shape {images.shape[1:]} but the model is built for {config.model.image_shape}")
  key = jax.random.key(config.seed) if key is None else key
  init_key, data_key = jax.random.split(key)

  manager = None
  params, opt_state, start, losses = None, None, 0, []
  if checkpoint_dir is not None:
    manager = checkpoint.TrainingCheckpoints(checkpoint_dir, keep=config.keep_checkpoints)
    latest = manager.latest_step()
    if latest is not None and not resume:
      raise ValueError(f"{checkpoint_dir} already holds checkpoints (latest step {latest}); resume from them "
                       "or choose an empty folder")
    if latest is not None:
      abstract_opt_state = jax.eval_shape(_optimizer().init, checkpoint.abstract_weights(config.model))
      params, opt_state, meta = manager.restore(latest, config.model, abstract_opt_state)
      if meta.get("key") != _key_record(key):
        raise ValueError(f"cannot resume from {manager.directory / str(latest)}: it was trained with another "
                         "PRNG key (seed); pass the same key to resume")
      start, losses = latest, list(meta.get("losses", []))[:latest]
  if params is None:
    params = model.init_params(config.model, key=init_key)
    opt_state = _optimizer().init(params.weights)

  step_fn = _step_function(config.model, config.batch_size, config.flips, config.max_shift, mesh)
  rates = learning_rates(config)
  device_images = jnp.asarray(images)
  weights = params.weights
  if mesh is not None:
    weights, opt_state, device_images, data_key = devices.replicate((weights, opt_state, device_images,
                                                                         data_key), mesh)

  def save(step):
    meta = {"train_config": config.to_dict(), "key": _key_record(key), "losses": losses[:step],
            "n_images": int(images.shape[0])}
    manager.save(step, model.make_params(config.model, weights), opt_state, meta)

  bar = _progress_bar(config.steps, start, enabled=progress)
  pending = []  # losses still on the device: reading each one at once would stall the pipeline
  started = time.perf_counter()
  try:
    for step in range(start, config.steps):
      weights, opt_state, loss = step_fn(weights, opt_state, device_images, data_key, step, rates[step])
      pending.append(loss)
      done = step + 1
      if manager is not None and (done % config.checkpoint_every == 0 or done == config.steps):
        losses.extend(float(x) for x in pending)
        pending.clear()
        save(done)
      if len(pending) >= 10 or done == config.steps:
        losses.extend(float(x) for x in pending)
        pending.clear()
      if bar is not None:
        bar.update(1)
        if losses and (done % 10 == 0 or done == config.steps):
          bar.set_postfix(loss=f"{losses[-1]:.4g}")
  finally:
    if bar is not None:
      bar.close()
    if manager is not None:
      manager.close()
  jax.block_until_ready(weights)
  if checkpoint_dir is not None and losses and jax.process_index() == 0:  # one writer, not one per host
    from shapjax import plots  # pylint: disable=g-import-not-at-top  (matplotlib only when a figure is asked for)
    folder = Path(checkpoint_dir)
    (folder / "loss.json").write_text(json.dumps({"loss": losses}))
    plots.plot_loss_curve(losses, folder / "loss.png",
                          title=f"training loss ({config.steps} steps, {time.perf_counter() - started:.0f} s "
                          "this session)")
  if mesh is not None:  # replicated on the mesh -> this process's first device, like a one-device run's params
    weights = devices.local_copy(weights)
  return model.make_params(config.model, weights)


def _progress_bar(total: int, initial: int, *, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)
