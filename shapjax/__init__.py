"""shapjax: where is an image anomalous? Shapley values of superpixels, as one jitted JAX program.

The public names below are imported on first use (PEP 562), so ``import shapjax`` costs almost nothing and a
process that only calls :func:`attribute` never imports matplotlib, orbax or scikit-learn.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module (concept) that defines it
_EXPORTS = {
    "attribute": "attribution",
    "attribute_batch": "attribution",
    "load": "checkpoint",
    "enable_compilation_cache": "compilation",
    "save": "checkpoint",
    "MVTecSplit": "data",
    "load_mvtec": "data",
    "make_demo_dataset": "data",
    "read_image": "data",
    "DatasetAttribution": "streaming",
    "attribute_dataset": "streaming",
    "initialize_processes": "devices",
    "make_mesh": "devices",
    "use_cpu_devices": "devices",
    "evaluate": "evaluation",
    "InpainterConfig": "inpainting",
    "InpainterParams": "inpainting",
    "init_inpainter": "inpainting",
    "inpaint": "inpainting",
    "inpainting_loss": "inpainting",
    "random_visible_masks": "inpainting",
    "heatmap": "masking",
    "inpainted_value_fn": "masking",
    "make_baseline": "masking",
    "masked_value_fn": "masking",
    "aupro": "metrics",
    "image_auroc": "metrics",
    "pixel_auroc": "metrics",
    "AutoencoderConfig": "model",
    "AutoencoderParams": "model",
    "init_autoencoder": "model",
    "reconstruct": "model",
    "reconstruction_loss": "model",
    "residual_map": "model",
    "DemoConfig": "pipeline",
    "explain_files": "pipeline",
    "run_demo": "pipeline",
    "plot_explanation": "plots",
    "plot_loss_curve": "plots",
    "plot_overlay_grid": "plots",
    "ShapleyResult": "sampling",
    "exact_semivalue": "sampling",
    "exact_shapley": "sampling",
    "shapley_values": "sampling",
    "segment": "segmentation",
    "segment_batch": "segmentation",
    "TrainConfig": "training",
    "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'shapjax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"shapjax.{module}"), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
  from shapjax.attribution import attribute, attribute_batch
  from shapjax.checkpoint import load, save
  from shapjax.compilation import enable_compilation_cache
  from shapjax.data import MVTecSplit, load_mvtec, make_demo_dataset, read_image
  from shapjax.devices import initialize_processes, make_mesh, use_cpu_devices
  from shapjax.evaluation import evaluate
  from shapjax.inpainting import (InpainterConfig, InpainterParams, init_inpainter, inpaint, inpainting_loss,
                                  random_visible_masks)
  from shapjax.masking import heatmap, inpainted_value_fn, make_baseline, masked_value_fn
  from shapjax.metrics import aupro, image_auroc, pixel_auroc
  from shapjax.model import (AutoencoderConfig, AutoencoderParams, init_autoencoder, reconstruct,
                             reconstruction_loss, residual_map)
  from shapjax.pipeline import DemoConfig, explain_files, run_demo
  from shapjax.plots import plot_explanation, plot_loss_curve, plot_overlay_grid
  from shapjax.sampling import ShapleyResult, exact_semivalue, exact_shapley, shapley_values
  from shapjax.segmentation import segment, segment_batch
  from shapjax.streaming import DatasetAttribution, attribute_dataset
  from shapjax.training import TrainConfig, train
