"""The public surface: every exported name exists, is documented, and nothing private leaks."""

import inspect

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
