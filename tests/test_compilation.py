"""enable_compilation_cache: JAX's persistent cache in a directory we name, with clear errors. speedups.jit_forward
and jit_init: the compiler options apply at top level on CPU only, compile a working program once, change no
result, and fall back to XLA's defaults for a program they fail, never turning a valid call into an error."""

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shapjax
from shapjax import compilation, sampling, speedups

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# The persistent compilation cache.


def test_cache_directory_is_created_and_turned_off_again(tmp_path):
  root = shapjax.enable_compilation_cache(tmp_path / "a" / "cache")
  try:
    assert root == (tmp_path / "a" / "cache").resolve() and root.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(root)
    jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3.0)(np.arange(7, dtype=np.float32)))
    assert any(root.iterdir())  # even a quick compile is kept
  finally:
    assert shapjax.enable_compilation_cache(None) is None
  assert jax.config.jax_compilation_cache_dir is None


def test_unusable_directory_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="compilation cache directory .*file"):
    shapjax.enable_compilation_cache(blocker)
  assert blocker.read_text() == "not a directory"  # nothing already there is lost


def test_unwritable_directory_is_named(tmp_path, monkeypatch):
  monkeypatch.setattr(compilation.os, "access", lambda path, mode: False)  # as for a read-only mount
  with pytest.raises(ValueError, match="compilation cache directory .*locked.* not writable"):
    shapjax.enable_compilation_cache(tmp_path / "locked")
  assert jax.config.jax_compilation_cache_dir is None


_CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, shapjax
    shapjax.enable_compilation_cache(sys.argv[1])
    params = shapjax.init_autoencoder((16, 16, 3), key=jax.random.key(0), features=(4, 8), latent_features=4)
    images = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    print(json.dumps(np.asarray(jax.jit(shapjax.reconstruction_loss)(params, images)).tolist()))
""")


@pytest.mark.slow
def test_a_new_process_reuses_the_cache(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  runs, entries = [], []
  for _ in range(2):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "c")], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    entries.append(sorted(p.name for p in (tmp_path / "c").iterdir()))
  assert runs[0] == runs[1]
  assert entries[0] and entries[0] == entries[1]  # the second process found every program, compiled none anew


# --------------------------------------------------------------------------------------------------------------
# Compiler options per compiled signature.


@pytest.fixture
def count_compiles():
  """The number of XLA compilations so far (a monitoring listener)."""
  count = [0]

  def listener(event, duration, **kwargs):  # pylint: disable=unused-argument
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield lambda: count[0]
  jax.monitoring.unregister_event_duration_listener(listener)


def _model_and_images(batch=2):
  params = shapjax.init_autoencoder((16, 16, 3), key=jax.random.key(0), features=(8, 16), latent_features=4)
  return params, jnp.asarray(np.random.default_rng(0).random((batch, 16, 16, 3)), jnp.float32)


def test_forward_options_apply_to_a_conv_program_compiled_once(count_compiles):
  params, images = _model_and_images()
  loss = speedups.jit_forward(lambda p, x: shapjax.reconstruction_loss(p, x))  # a function of its own: JAX's cache
  # is per function, shared by every jit of it
  assert jax.default_backend() == "cpu" and speedups.enabled()
  before = count_compiles()
  tuned = loss(params, images)
  assert count_compiles() - before == 1  # the first call compiles with the options, and only once
  assert loss.uses_options(params, images)  # the speed-up is not silently lost
  np.testing.assert_array_equal(loss(params, images), tuned)
  assert count_compiles() - before == 1 and loss.cache_size() == 1
  np.testing.assert_allclose(tuned, jax.jit(lambda p, x: shapjax.reconstruction_loss(p, x))(params, images),
                             rtol=1e-5)
  loss(params, images[:1])  # a new shape is a new signature
  assert loss.cache_size() == 2 and loss.uses_options(params, images[:1])


def test_forward_options_only_at_top_level_on_cpu(monkeypatch):
  params, images = _model_and_images()
  loss = speedups.jit_forward(lambda p, x: shapjax.reconstruction_loss(p, x))  # a function of its own: JAX's cache
  # is per function, shared by every jit of it
  nested = jax.jit(lambda x: loss(params, x))(images)  # JAX refuses compiler options on a nested jit
  assert loss.cache_size() == 0
  monkeypatch.setenv("SHAPJAX_XLA_DEFAULTS", "1")
  assert not speedups.enabled()
  plain = loss(params, images)
  assert not loss.uses_options(params, images) and loss.cache_size() == 1
  np.testing.assert_allclose(nested, plain, rtol=1e-6)


def _kernel_shapley(key, *, n_players):
  # The kernel estimator's gram matrices, f32[n_perm, n, n]: XLA:CPU's YNN fusions compile this program and then
  # refuse to run it ("Instruction with unsupported layout in YNN fusion") for 12 or more players.
  weights = jnp.linspace(0.1, 1.0, n_players)
  value_fn = lambda coalitions: jnp.sum(coalitions * weights[None, :], axis=-1) ** 2  # noqa: E731
  return sampling.shapley_values(value_fn, n_players, 32, key=key, estimator="kernel").values


@pytest.mark.parametrize("n_players", [8, pytest.param(12, marks=pytest.mark.slow),
                                       pytest.param(64, marks=pytest.mark.slow)])
def test_a_program_the_options_fail_falls_back_to_xla_defaults(n_players, count_compiles):
  tuned = functools.partial(speedups.jit_forward, static_argnames=("n_players",))(_kernel_shapley)
  expected = jax.jit(_kernel_shapley, static_argnames=("n_players",))(jax.random.key(0), n_players=n_players)
  values = tuned(jax.random.key(0), n_players=n_players)  # must not raise
  np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
  before = count_compiles()
  np.testing.assert_allclose(tuned(jax.random.key(0), n_players=n_players), expected, rtol=1e-5, atol=1e-6)
  assert count_compiles() == before  # the decision is remembered: neither variant compiles again
  if n_players >= 12:
    assert not tuned.uses_options(jax.random.key(0), n_players=n_players)


def test_unknown_options_fall_back_to_xla_defaults():
  square = speedups._jit_with_options({"xla_cpu_no_such_option_for_shapjax": "1"}, lambda x: x * x, ())
  np.testing.assert_array_equal(square(np.arange(3.0, dtype=np.float32)), [0.0, 1.0, 4.0])
  assert not square.uses_options(np.arange(3.0, dtype=np.float32))


def test_errors_of_the_call_itself_are_not_hidden():
  add = speedups.jit_forward(lambda x, y: x + y)
  with pytest.raises(TypeError):
    add(np.zeros(3, np.float32), np.zeros(4, np.float32))
