"""shapjax: where is an image anomalous? Shapley values of superpixels, as one jitted JAX program."""

from shapjax.attribution import attribute
from shapjax.attribution import attribute_batch
from shapjax.checkpoint import load
from shapjax.checkpoint import save
from shapjax.data import MVTecSplit
from shapjax.data import load_mvtec
from shapjax.data import make_demo_dataset
from shapjax.data import read_image
from shapjax.distributed import DatasetAttribution
from shapjax.distributed import attribute_dataset
from shapjax.distributed import attribute_sharded
from shapjax.distributed import make_mesh
from shapjax.evaluation import evaluate
from shapjax.masking import heatmap
from shapjax.masking import make_baseline
from shapjax.masking import masked_value_fn
from shapjax.metrics import aupro
from shapjax.metrics import image_auroc
from shapjax.metrics import pixel_auroc
from shapjax.model import AutoencoderConfig
from shapjax.model import AutoencoderParams
from shapjax.model import init_autoencoder
from shapjax.model import reconstruct
from shapjax.model import reconstruction_loss
from shapjax.model import residual_map
from shapjax.pipeline import DemoConfig
from shapjax.pipeline import explain_files
from shapjax.pipeline import run_demo
from shapjax.plots import plot_explanation
from shapjax.plots import plot_loss_curve
from shapjax.plots import plot_overlay_grid
from shapjax.sampling import ShapleyResult
from shapjax.sampling import exact_shapley
from shapjax.sampling import shapley_values
from shapjax.segmentation import segment
from shapjax.segmentation import segment_batch
from shapjax.train import TrainConfig
from shapjax.train import train

__version__ = "0.1.0"

__all__ = [
    "AutoencoderConfig",
    "AutoencoderParams",
    "DatasetAttribution",
    "DemoConfig",
    "MVTecSplit",
    "ShapleyResult",
    "TrainConfig",
    "attribute",
    "attribute_batch",
    "attribute_dataset",
    "attribute_sharded",
    "aupro",
    "evaluate",
    "exact_shapley",
    "explain_files",
    "heatmap",
    "image_auroc",
    "init_autoencoder",
    "load",
    "load_mvtec",
    "make_baseline",
    "make_demo_dataset",
    "make_mesh",
    "masked_value_fn",
    "pixel_auroc",
    "plot_explanation",
    "plot_loss_curve",
    "plot_overlay_grid",
    "read_image",
    "reconstruct",
    "reconstruction_loss",
    "residual_map",
    "run_demo",
    "save",
    "segment",
    "segment_batch",
    "shapley_values",
    "train",
]
