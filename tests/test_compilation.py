"""enable_compilation_cache: exported programs give the plain programs' results, survive the process, and a bad
cache file or directory gives a warning or a clear error, never a wrong result. jit_forward: the attribution
programs' XLA options apply at top level on CPU only, change no result, and fall back when unknown."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import shapjax
from shapjax import compilation

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 3)
REGIONS = 6


@pytest.fixture
def cache(tmp_path):
  root = shapjax.enable_compilation_cache(tmp_path / "cache")
  yield root
  shapjax.enable_compilation_cache(None)


def _inputs():
  image = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
  return image, shapjax.segment(image, max_regions=REGIONS)


def _attribute(params, image, labels, n_perm=4, key=1):
  return shapjax.attribute(params, image, labels, n_perm, key=jax.random.key(key), max_regions=REGIONS)


def _files(root):
  return sorted(p.name.split("-")[0] for p in (root / "exported").iterdir())


def _assert_same(a, b):
  for field in ("values", "stderr", "n_evals", "converged"):
    np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=field)


def test_exported_programs_equal_plain_ones_and_are_reused(cache, monkeypatch):
  image, labels = _inputs()
  params = shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4, 8), latent_features=4)
  result = _attribute(params, image, labels)
  assert _files(cache) == ["attribute", "init_autoencoder"]
  shapjax.enable_compilation_cache(None)
  plain_params = shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4, 8), latent_features=4)
  jax.tree.map(np.testing.assert_array_equal, params.weights, plain_params.weights)
  _assert_same(result, _attribute(plain_params, image, labels))
  assert float(np.abs(result.values).max()) > 0

  # As a new process would: nothing in memory, so the programs come from the files, not from tracing.
  shapjax.enable_compilation_cache(cache)
  monkeypatch.setattr(jax.export, "export", lambda *a, **k: pytest.fail("traced again instead of loading"))
  again = shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4, 8), latent_features=4)
  jax.tree.map(np.testing.assert_array_equal, params.weights, again.weights)
  _assert_same(result, _attribute(again, image, labels))
  other_key = _attribute(again, image, labels, key=2)  # a new key is an input, not a new program
  assert not np.array_equal(np.asarray(other_key.values), np.asarray(result.values))


def test_new_settings_or_shapes_are_new_programs(cache):
  image, labels = _inputs()
  params = shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4, 8), latent_features=4)
  _attribute(params, image, labels, n_perm=4)
  _attribute(params, image, labels, n_perm=6)
  assert _files(cache) == ["attribute", "attribute", "init_autoencoder"]
  wide = shapjax.init_autoencoder((16, 24, 3), key=jax.random.key(0), features=(4, 8), latent_features=4)
  wide_image = np.random.default_rng(1).random((16, 24, 3), dtype=np.float32)
  result = shapjax.attribute(wide, wide_image, shapjax.segment(wide_image, max_regions=REGIONS), 4,
                             max_regions=REGIONS)
  assert result.values.shape == (REGIONS,)
  assert _files(cache).count("attribute") == 3 and _files(cache).count("init_autoencoder") == 2
  baseline = np.full(SHAPE, 0.3, np.float32)  # an array baseline is an input of its own program
  with_array = shapjax.attribute(params, image, labels, 4, baseline=baseline, max_regions=REGIONS)
  assert _files(cache).count("attribute") == 4
  shapjax.enable_compilation_cache(None)
  _assert_same(with_array, shapjax.attribute(params, image, labels, 4, baseline=baseline, max_regions=REGIONS))


def test_inside_jit_traces_as_usual(cache):
  image, labels = _inputs()
  params = shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4, 8), latent_features=4)
  before = _files(cache)
  values = jax.jit(lambda img: _attribute(params, img, labels).values)(image)
  assert _files(cache) == before  # nothing exported from inside a trace
  np.testing.assert_allclose(values, _attribute(params, image, labels).values, rtol=1e-5, atol=1e-7)


def test_corrupt_file_warns_and_is_rewritten(cache):
  image, labels = _inputs()
  params = shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4, 8), latent_features=4)
  expected = _attribute(params, image, labels)
  (path,) = (cache / "exported").glob("attribute-*")
  good = path.read_bytes()
  for damage in (b"", b"not a flatbuffer at all", good[: len(good) // 2]):
    path.write_bytes(damage)
    shapjax.enable_compilation_cache(cache)  # forget what this process loaded
    with pytest.warns(UserWarning, match="unreadable exported program"):
      result = _attribute(params, image, labels)
    _assert_same(expected, result)
    rewritten = jax.export.deserialize(bytearray(path.read_bytes()))  # traced again and written whole
    assert [a.shape for a in rewritten.in_avals] == [a.shape for a in jax.export.deserialize(bytearray(good)).in_avals]


def test_unusable_directory_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="compilation cache directory .*file"):
    shapjax.enable_compilation_cache(blocker)
  assert blocker.read_text() == "not a directory"  # nothing already there is lost
  assert compilation._settings["exported_dir"] is None


def test_unwritable_cache_only_warns(cache, monkeypatch):
  image, labels = _inputs()
  params = shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(4, 8), latent_features=4)

  def refuse(*args, **kwargs):
    raise PermissionError("read-only file system")

  monkeypatch.setattr(compilation.tempfile, "NamedTemporaryFile", refuse)
  with pytest.warns(UserWarning, match="cannot write exported program"):
    result = _attribute(params, image, labels, n_perm=8)
  assert result.values.shape == (REGIONS,) and _files(cache).count("attribute") == 0


_CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, shapjax
    shapjax.enable_compilation_cache(sys.argv[1])
    if sys.argv[2] == "warm":  # a warm start must load, not trace
        jax.export.export = None
    params = shapjax.init_autoencoder((16, 16, 3), key=jax.random.key(0), features=(4, 8), latent_features=4)
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    labels = shapjax.segment(image, max_regions=6)
    result = shapjax.attribute(params, image, labels, 4, key=jax.random.key(1), max_regions=6)
    print(json.dumps(np.asarray(result.values).tolist()))
""")


def test_a_new_process_reuses_the_cache(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  runs = []
  for mode in ("cold", "warm"):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "c"), mode], capture_output=True,
                         text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  assert runs[0] == runs[1]
  assert any((tmp_path / "c" / "xla").iterdir())  # XLA's executables are kept too


def _random_params():
  return shapjax.init_autoencoder(SHAPE, key=jax.random.key(0), features=(8, 16), latent_features=4)


def test_forward_options_apply_at_top_level_on_cpu_only(monkeypatch):
  image, labels = _inputs()
  assert jax.default_backend() == "cpu"
  # This jaxlib knows the options (the README's attribution speed depends on them).
  assert compilation.forward_options((image,)) == compilation._CPU_FORWARD_OPTIONS
  seen = []
  jax.jit(lambda x: seen.append(compilation.forward_options((x,))) or x)(image)
  assert seen == [None]  # JAX refuses compiler options on a nested jit
  monkeypatch.setenv("SHAPJAX_XLA_DEFAULTS", "1")
  assert compilation.forward_options((image,)) is None


def test_attribute_with_forward_options_equals_xla_defaults(monkeypatch):
  params = _random_params()
  image, labels = _inputs()
  used = []
  original = compilation.forward_options
  monkeypatch.setattr(compilation, "forward_options", lambda args: used.append(original(args)) or used[-1])
  tuned = _attribute(params, image, labels)
  tuned_batch = shapjax.attribute_batch(params, image[None], labels[None], 4, max_regions=REGIONS)
  assert used and all(options == compilation._CPU_FORWARD_OPTIONS for options in used)
  from shapjax import attribution
  tuned_key = tuple(sorted(compilation._CPU_FORWARD_OPTIONS.items()))
  assert attribution._attribute_jit._variants[tuned_key]._cache_size() >= 1  # compiled with the options
  monkeypatch.setenv("SHAPJAX_XLA_DEFAULTS", "1")
  used.clear()
  plain = _attribute(params, image, labels)
  plain_batch = shapjax.attribute_batch(params, image[None], labels[None], 4, max_regions=REGIONS)
  assert used and all(options is None for options in used)
  scale = float(np.max(np.abs(plain.values)))
  np.testing.assert_allclose(tuned.values, plain.values, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(tuned_batch.values, plain_batch.values, rtol=0, atol=1e-5 * scale)
  assert not np.array_equal(tuned.values, np.zeros_like(tuned.values))


def test_unknown_forward_options_fall_back_to_xla_defaults(monkeypatch):
  monkeypatch.setattr(compilation, "_CPU_FORWARD_OPTIONS", {"xla_cpu_no_such_option_for_shapjax": "1"})
  image, labels = _inputs()
  assert compilation.forward_options((image,)) is None
  result = _attribute(_random_params(), image, labels)
  assert np.all(np.isfinite(result.values))
