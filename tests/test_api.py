"""The public surface: every exported name exists, is documented, and nothing private leaks."""

import inspect
import subprocess
import sys

import pytest

import shapjax


def test_all_public_names_exist_and_have_docstrings():
  assert len(shapjax.__all__) == len(set(shapjax.__all__))
  for name in shapjax.__all__:
    obj = getattr(shapjax, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 20, f"shapjax.{name} has no docstring"


def test_options_are_keyword_only():
  for fn, positional in [(shapjax.attribute, {"params", "image", "labels", "n_perm"}),
                         (shapjax.attribute_batch, {"params", "images", "labels", "n_perm"}),
                         (shapjax.shapley_values, {"value_fn", "n_players", "n_perm"}),
                         (shapjax.segment, {"image"})]:
    for parameter in inspect.signature(fn).parameters.values():
      if parameter.name not in positional:
        assert parameter.kind in (parameter.KEYWORD_ONLY, parameter.VAR_KEYWORD), (fn.__name__, parameter.name)


def test_version():
  assert isinstance(shapjax.__version__, str)


@pytest.mark.slow
def test_import_is_lazy_and_every_name_resolves():
  # ``import shapjax`` must not pull in plotting, checkpointing or scikit-learn (cold start), and the
  # attribution path must not either; every public name then resolves on first use.
  code = ("import sys, shapjax; shapjax.attribute; shapjax.segment; shapjax.init_autoencoder; "
          "heavy = [m for m in ('matplotlib', 'orbax', 'sklearn', 'optax', 'scipy.stats') if m in sys.modules]; "
          "print(heavy); [getattr(shapjax, n) for n in shapjax.__all__]; print(sorted(set(shapjax.__all__) - set(dir(shapjax))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
  assert out[0] == "[]", out
  assert out[1] == "[]", out
  with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
    shapjax.nonexistent  # pylint: disable=pointless-statement


def test_train_function_is_not_shadowed_by_a_module():
  import shapjax.training  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  assert callable(shapjax.train) and not inspect.ismodule(shapjax.train)
  assert shapjax.train is shapjax.training.train
