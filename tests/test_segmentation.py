"""SLIC label maps: counts, padding contract, dtypes, batch form, bad input."""

import numpy as np
import pytest
import skimage.data

import shapjax

BRICK = skimage.data.brick()[:96, :128]  # grey uint8
ASTRONAUT = skimage.data.astronaut()[::4, ::4]  # RGB uint8, 128 x 128


@pytest.mark.parametrize("max_regions", [8, 32, 64])
@pytest.mark.parametrize("image", [BRICK, ASTRONAUT, ASTRONAUT.astype(np.float32) / 255, BRICK[..., None]],
                         ids=["grey-uint8", "rgb-uint8", "rgb-float", "grey-hw1"])
def test_labels_are_consecutive_and_bounded(image, max_regions):
  labels = shapjax.segment(image, max_regions=max_regions)
  assert labels.shape == image.shape[:2]
  assert labels.dtype == np.int32
  ids = np.unique(labels)
  np.testing.assert_array_equal(ids, np.arange(ids.size))
  assert ids.size <= max_regions
  # SLIC alone falls well short of the request on small images; we must get close to it.
  assert ids.size >= 0.8 * max_regions


def test_over_segmentation_is_merged_down():
  labels = shapjax.segment(ASTRONAUT, max_regions=10, n_segments=10, compactness=0.01)
  assert labels.max() + 1 <= 10


def test_n_segments_aims_below_max_regions():
  labels = shapjax.segment(ASTRONAUT, max_regions=64, n_segments=16)
  assert 12 <= labels.max() + 1 <= 20


def test_batch_matches_single_images():
  images = np.stack([ASTRONAUT, ASTRONAUT[::-1], ASTRONAUT[:, ::-1]])
  batch = shapjax.segment_batch(images, max_regions=16, n_workers=2)
  assert batch.shape == (3, 128, 128) and batch.dtype == np.int32
  for image, labels in zip(images, batch):
    np.testing.assert_array_equal(labels, shapjax.segment(image, max_regions=16))


@pytest.mark.parametrize("image, error, match", [
    (np.zeros((4, 4, 4, 3)), ValueError, "shape"),
    (np.zeros((8, 8, 2)), ValueError, "channels"),
    (np.full((8, 8), np.nan), ValueError, "NaN"),
    (np.zeros((8, 8), dtype=bool), TypeError, "dtype"),
])
def test_bad_images_are_named(image, error, match):
  with pytest.raises(error, match=match):
    shapjax.segment(image, max_regions=4)


def test_bad_counts_and_mixed_batches_are_named():
  with pytest.raises(ValueError, match="max_regions"):
    shapjax.segment(BRICK, max_regions=0)
  with pytest.raises(ValueError, match="height and width"):
    shapjax.segment_batch([BRICK, BRICK[:50]], max_regions=4)
  with pytest.raises(ValueError, match="no images"):
    shapjax.segment_batch([], max_regions=4)
