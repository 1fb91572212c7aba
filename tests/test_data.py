"""MVTec-layout loading and the generated demo dataset (numpy + Pillow only: no JAX compiles here)."""

import hashlib

import numpy as np
import pytest
from PIL import Image

import shapjax


def _write(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _grey(rng, height, width):
  return rng.integers(0, 256, (height, width), dtype=np.uint8)


def _mvtec(tmp_path, *, rgb=False):
  """A small MVTec-layout folder: odd sizes, PNG/JPEG/BMP, one defect type with masks."""
  rng = np.random.default_rng(0)
  root = tmp_path / "set"
  _write(root / "train" / "good" / "a.png", _grey(rng, 21, 35))
  _write(root / "train" / "good" / "b.bmp", _grey(rng, 40, 17))
  colour = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) if rgb else _grey(rng, 30, 30)
  _write(root / "train" / "good" / "c.png", colour)
  (root / "train" / "good" / "notes.txt").write_text("not an image")
  _write(root / "test" / "good" / "g.jpg", _grey(rng, 33, 29))
  _write(root / "test" / "crack" / "d.png", _grey(rng, 25, 31))
  mask = np.zeros((25, 31), np.uint8)
  mask[5:15, 10:20] = 255
  _write(root / "ground_truth" / "crack" / "d_mask.png", mask)
  return root, mask > 0


def test_load_train_grey_resizes_odd_sizes(tmp_path):
  root, _ = _mvtec(tmp_path)
  split = shapjax.load_mvtec(root, split="train", image_size=(16, 24))
  assert split.images.shape == (3, 16, 24, 1) and split.images.dtype == np.float32
  assert 0 <= split.images.min() and split.images.max() <= 1
  assert [p.split("/")[-1] for p in split.paths] == ["a.png", "b.bmp", "c.png"]
  assert split.original_sizes == [(21, 35), (40, 17), (30, 30)]
  assert split.defect_types == ["good"] * 3 and split.labels.tolist() == [0, 0, 0] and len(split) == 3
  assert not split.masks.any() and split.masks.shape == (3, 16, 24)
  assert [m.shape for m in split.original_masks] == [(21, 35), (40, 17), (30, 30)]


def test_load_rgb_makes_three_channels(tmp_path):
  root, _ = _mvtec(tmp_path, rgb=True)
  split = shapjax.load_mvtec(root, split="train", image_size=20)
  assert split.images.shape == (3, 20, 20, 3)
  grey = split.images[0]
  np.testing.assert_array_equal(grey[..., 0], grey[..., 1])  # a grey file is repeated, not invented
  assert shapjax.load_mvtec(root, split="train", image_size=20, channels=1).images.shape == (3, 20, 20, 1)


def test_load_test_split_has_masks_at_both_sizes(tmp_path):
  root, mask = _mvtec(tmp_path)
  split = shapjax.load_mvtec(root, split="test", image_size=(50, 62))
  assert split.defect_types == ["good", "crack"]
  assert split.labels.tolist() == [0, 1]
  np.testing.assert_array_equal(split.original_masks[1], mask)
  assert not split.original_masks[0].any() and split.original_masks[0].shape == (33, 29)
  # Doubling the size doubles the mask's box: rows 10..29, columns 20..39.
  rows, cols = np.nonzero(split.masks[1])
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 29, 20, 39)
  assert not split.masks[0].any()


def test_16_bit_png(tmp_path):
  path = tmp_path / "deep.png"
  array = np.array([[0, 65535], [32768, 16384]], np.uint16)
  Image.fromarray(array).save(path)
  image = shapjax.read_image(path)
  np.testing.assert_allclose(image[..., 0], array / 65535.0, atol=1e-6)


def test_broken_image_names_the_file(tmp_path):
  root, _ = _mvtec(tmp_path)
  (root / "train" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(ValueError, match="broken.png"):
    shapjax.load_mvtec(root, split="train", image_size=16)


def test_truncated_jpeg_names_the_file(tmp_path):
  root, _ = _mvtec(tmp_path)
  data = (root / "test" / "good" / "g.jpg").read_bytes()
  (root / "test" / "good" / "g.jpg").write_bytes(data[: len(data) // 3])
  with pytest.raises(ValueError, match="g.jpg"):
    shapjax.load_mvtec(root, split="test", image_size=16)


def test_mask_of_wrong_size_names_the_mask(tmp_path):
  root, _ = _mvtec(tmp_path)
  _write(root / "ground_truth" / "crack" / "d_mask.png", np.zeros((10, 10), np.uint8))
  with pytest.raises(ValueError, match="d_mask.png.*size"):
    shapjax.load_mvtec(root, split="test", image_size=16)


def test_missing_mask_names_the_image(tmp_path):
  root, _ = _mvtec(tmp_path)
  (root / "ground_truth" / "crack" / "d_mask.png").unlink()
  with pytest.raises(ValueError, match="d.png"):
    shapjax.load_mvtec(root, split="test", image_size=16)


@pytest.mark.parametrize("case", ["missing_root", "missing_train", "empty_train"])
def test_missing_or_empty_folder(tmp_path, case):
  root, _ = _mvtec(tmp_path)
  if case == "missing_root":
    root = tmp_path / "nowhere"
  else:
    for path in (root / "train" / "good").iterdir():
      path.unlink()
    if case == "missing_train":
      (root / "train" / "good").rmdir()
  with pytest.raises(ValueError, match="nowhere" if case == "missing_root" else "train/good"):
    shapjax.load_mvtec(root, split="train", image_size=16)


def test_bad_arguments(tmp_path):
  root, _ = _mvtec(tmp_path)
  with pytest.raises(ValueError, match="split"):
    shapjax.load_mvtec(root, split="validation", image_size=16)
  with pytest.raises(ValueError, match="image_size"):
    shapjax.load_mvtec(root, split="train", image_size=(16, 0))
  with pytest.raises(ValueError, match="different sizes"):
    shapjax.load_mvtec(root, split="train", image_size=None)


def _digest(root):
  return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()


def test_demo_dataset_is_deterministic_and_masks_are_the_painted_pixels(tmp_path):
  a = shapjax.make_demo_dataset(tmp_path / "a", n_train=5, n_test=6, image_size=(32, 40), seed=3)
  b = shapjax.make_demo_dataset(tmp_path / "b", n_train=5, n_test=6, image_size=(32, 40), seed=3)
  c = shapjax.make_demo_dataset(tmp_path / "c", n_train=5, n_test=6, image_size=(32, 40), seed=4)
  assert _digest(a) == _digest(b) != _digest(c)
  train = shapjax.load_mvtec(a, split="train", image_size=None)
  test = shapjax.load_mvtec(a, split="test", image_size=None)
  assert train.images.shape == (5, 32, 40, 1) and test.images.shape == (6, 32, 40, 1)
  assert sorted(set(test.defect_types)) == ["blob", "good", "scratch"] and int(test.labels.sum()) == 3
  for image, mask, kind in zip(test.images[..., 0], test.masks, test.defect_types):
    if kind == "good":
      assert not mask.any()
      continue
    assert mask.any()
    # Painted pixels hold one constant level far from the texture; the rest is untouched texture.
    painted = image[mask]
    assert np.ptp(painted) <= 1 / 255 + 1e-6
    assert abs(float(np.median(image[~mask])) - float(painted[0])) > 0.2
  scratches = [m.sum() for m, t in zip(test.masks, test.defect_types) if t == "scratch"]
  blobs = [m.sum() for m, t in zip(test.masks, test.defect_types) if t == "blob"]
  assert max(scratches) < min(blobs) * 3  # both are small defects, a few percent of the image at most
  assert max(scratches + blobs) < 0.15 * 32 * 40
