"""shapjax: where is an image anomalous? Shapley values of superpixels, as one jitted JAX program."""

from shapjax.attribution import attribute
from shapjax.attribution import attribute_batch
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
from shapjax.sampling import ShapleyResult
from shapjax.sampling import exact_shapley
from shapjax.sampling import shapley_values
from shapjax.segmentation import segment
from shapjax.segmentation import segment_batch

__version__ = "0.1.0"

__all__ = [
    "AutoencoderConfig",
    "AutoencoderParams",
    "DatasetAttribution",
    "ShapleyResult",
    "attribute",
    "attribute_batch",
    "attribute_dataset",
    "attribute_sharded",
    "aupro",
    "evaluate",
    "exact_shapley",
    "heatmap",
    "image_auroc",
    "init_autoencoder",
    "make_baseline",
    "make_mesh",
    "masked_value_fn",
    "pixel_auroc",
    "reconstruct",
    "reconstruction_loss",
    "residual_map",
    "segment",
    "segment_batch",
    "shapley_values",
]
