"""Metrics against brute-force threshold loops and hand-made cases with known answers."""

import numpy as np
import pytest
import scipy.ndimage
import sklearn.metrics

import shapjax
from shapjax import metrics


def brute_force_aupro(maps, masks, max_fpr):
  """MVTec AD's definition, literally: one threshold at a time, regions by 8-connected labelling."""
  regions = []
  for g in masks:
    labelled, n = scipy.ndimage.label(g, structure=np.ones((3, 3)))
    regions.append([labelled == k for k in range(1, n + 1)])
  thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
  n_normal = sum(int((~g).sum()) for g in masks)
  fprs, pros = [0.0], [0.0]
  for t in thresholds:
    false_pos = sum(int(((m >= t) & ~g).sum()) for m, g in zip(maps, masks))
    overlaps = [float((m >= t)[r].mean()) for m, rs in zip(maps, regions) for r in rs]
    fprs.append(false_pos / n_normal)
    pros.append(float(np.mean(overlaps)))
  fprs.append(1.0)
  pros.append(1.0)
  # Trapezoids up to max_fpr, the last one cut at max_fpr by linear interpolation.
  area = 0.0
  for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:
      y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
      x1 = max_fpr
    area += (x1 - x0) * (y0 + y1) / 2
  return area / max_fpr


def random_case(rng, n_images, shapes=None, quantize=None):
  maps, masks = [], []
  for i in range(n_images):
    shape = shapes[i] if shapes else (int(rng.integers(5, 12)), int(rng.integers(5, 12)))
    g = np.zeros(shape, bool)
    if i % 3 != 0:  # some images are good
      for _ in range(int(rng.integers(1, 4))):
        y, x = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 1)
        g[y:y + int(rng.integers(1, 4)), x:x + int(rng.integers(1, 4))] = True
    m = rng.random(shape) + 0.7 * g
    if quantize:
      m = np.round(m * quantize) / quantize  # ties across pixels
    maps.append(m.astype(np.float32))
    masks.append(g)
  return maps, masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, max_fpr):
  rng = np.random.default_rng(seed)
  maps, masks = random_case(rng, 5, quantize=8 if seed % 2 else None)
  expected = brute_force_aupro(maps, masks, max_fpr)
  np.testing.assert_allclose(shapjax.aupro(maps, masks, max_fpr=max_fpr), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_auroc_matches_sklearn(seed):
  rng = np.random.default_rng(100 + seed)
  maps, masks = random_case(rng, 4, quantize=6 if seed % 2 else None)
  expected = sklearn.metrics.roc_auc_score(np.concatenate([g.ravel() for g in masks]),
                                           np.concatenate([m.ravel() for m in maps]))
  result = metrics.pixel_metrics(maps, masks)
  np.testing.assert_allclose(result.pixel_auroc, expected, rtol=1e-12)
  np.testing.assert_allclose(shapjax.pixel_auroc(maps, masks), expected, rtol=1e-12)
  np.testing.assert_allclose(result.aupro, shapjax.aupro(maps, masks), rtol=1e-12)


def _two_defects():
  masks = np.zeros((3, 10, 10), bool)
  masks[1, 1:3, 1:3] = True     # a small defect
  masks[2, 4:10, 2:9] = True    # a large one
  return masks


def test_perfect_and_inverted_maps():
  masks = _two_defects()
  perfect = masks.astype(np.float32)
  assert shapjax.aupro(perfect, masks) == pytest.approx(1.0)
  assert shapjax.pixel_auroc(perfect, masks) == pytest.approx(1.0)
  inverted = 1.0 - perfect
  assert shapjax.aupro(inverted, masks) == pytest.approx(0.0)
  assert shapjax.pixel_auroc(inverted, masks) == pytest.approx(0.0)


def test_constant_map_is_chance():
  masks = _two_defects()
  constant = np.zeros(masks.shape, np.float32)
  assert shapjax.pixel_auroc(constant, masks) == pytest.approx(0.5)
  # One threshold takes everything at once: the curve is the diagonal (0,0)-(1,1), PRO = FPR.
  assert shapjax.aupro(constant, masks, max_fpr=0.3) == pytest.approx(0.15)
  assert shapjax.aupro(constant, masks, max_fpr=1.0) == pytest.approx(0.5)


def test_regions_count_equally_whatever_their_size():
  # The map finds the small defect perfectly and misses the large one entirely (scores it like background).
  masks = _two_defects()
  maps = np.zeros(masks.shape, np.float32)
  maps[1, 1:3, 1:3] = 1.0
  # Pixel AUROC is dominated by the large defect's pixels; PRO is the mean of recall 1 and 0 at low FPR.
  n_small, n_large, n_normal = 4, 42, 300 - 46
  # Ranking: 4 small-defect pixels first, then a tie of everything else.
  expected_auroc = (n_small / (n_small + n_large)) * 1.0 + (n_large / (n_small + n_large)) * 0.5
  assert shapjax.pixel_auroc(maps, masks) == pytest.approx(expected_auroc)
  # The curve: (0,0) -> (0, 0.5) -> (1, 1); area to 0.3 = 0.3 * 0.5 + 0.3 * 0.3 * 0.5 / 2.
  assert shapjax.aupro(maps, masks) == pytest.approx((0.3 * 0.5 + 0.3 * 0.15 / 2) / 0.3)
  del n_normal


def test_diagonal_touching_pixels_are_one_region():
  masks = np.zeros((1, 6, 6), bool)
  masks[0, 1, 1] = masks[0, 2, 2] = True  # touch only at a corner: one 8-connected region
  maps = np.zeros(masks.shape, np.float32)
  maps[0, 1, 1] = 1.0  # finds half of it
  # One region with recall 0.5 at FPR 0 -> then to (1, 1).
  assert shapjax.aupro(maps, masks, max_fpr=1.0) == pytest.approx(0.5 + 0.5 * 0.5)
  # With 4-connectivity it would be two regions (recalls 1 and 0): same mean here, so check the count too.
  _, n = metrics._regions([masks[0]])
  assert n == 1


def test_maps_of_different_sizes():
  rng = np.random.default_rng(7)
  maps, masks = random_case(rng, 4, shapes=[(6, 9), (11, 5), (7, 7), (8, 12)])
  np.testing.assert_allclose(shapjax.aupro(maps, masks), brute_force_aupro(maps, masks, 0.3), rtol=1e-9)


def test_image_auroc():
  assert shapjax.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  assert shapjax.image_auroc([3.0, 2.0, 1.0], [True, False, False]) == pytest.approx(1.0)


def test_errors():
  masks = _two_defects()
  with pytest.raises(ValueError, match="shape"):
    shapjax.aupro([np.zeros((4, 4))], [np.zeros((5, 4), bool)])
  with pytest.raises(ValueError, match="defective"):
    shapjax.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool))
  with pytest.raises(ValueError, match="both"):
    shapjax.image_auroc([0.1, 0.2], [0, 0])
  with pytest.raises(ValueError, match="NaN"):
    shapjax.pixel_auroc(np.full(masks.shape, np.nan), masks)
  with pytest.raises(ValueError, match="max_fpr"):
    shapjax.aupro(masks.astype(float), masks, max_fpr=0.0)


def test_grouped_pixel_metrics_equal_separate_calls():
  rng = np.random.default_rng(11)
  maps, masks = random_case(rng, 6, quantize=5)
  groups = {"all": np.ones(6, bool), "some": np.asarray([1, 1, 0, 1, 0, 1], bool)}
  grouped = metrics.grouped_pixel_metrics(maps, masks, groups)
  for name, members in groups.items():
    chosen = np.flatnonzero(members)
    single = metrics.pixel_metrics([maps[i] for i in chosen], [masks[i] for i in chosen])
    assert grouped[name].pixel_auroc == pytest.approx(single.pixel_auroc, rel=1e-12)
    assert grouped[name].aupro == pytest.approx(single.aupro, rel=1e-12)
