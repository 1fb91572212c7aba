"""Compiled programs that outlive the process: JAX's persistent XLA cache plus exported (traced) programs.

JAX's persistent compilation cache skips XLA's compilation in a new process, but not the Python-side tracing and
lowering that come before it: for ``init_autoencoder`` and ``attribute`` on a 128x128x3 image that is about
1.4 s of a warm start. :func:`enable_compilation_cache` turns on both caches in one directory:

* ``DIR/xla``: JAX's persistent cache of compiled executables (every jitted program of the process);
* ``DIR/exported``: the traced programs of :func:`shapjax.init_autoencoder` and :func:`shapjax.attribute`
  (single device, fixed ``n_perm``) as ``jax.export`` artifacts (StableHLO), one file per program, shape and
  setting. A new process deserialises one (milliseconds) instead of tracing and lowering it, and XLA's cache
  supplies the executable.

An exported program is keyed on everything that could change it: the program's name, the input shapes and
dtypes, its static settings, the versions of jax, jaxlib and flax, the backend, the JAX options that change
traced code (x64, matmul precision, PRNG implementation), and a hash of shapjax's own source files. An
unreadable file is reported with a warning and traced again; a file is written whole or not at all.
Programs called inside a user's ``jit`` are traced as usual.

As with JAX's own cache, the directory is trusted: do not share it with users you do not trust.

The module also holds the XLA options of the library's forward-only (attribution) programs, :func:`jit_forward`:
on CPU, XLA's YNNPACK fusions take the element-wise work around each convolution (bias, ReLU, the
compositing and the loss) along with it, which made attribution 1.3-1.4x faster (``benchmarks/README.md``,
session 7). Set ``SHAPJAX_XLA_DEFAULTS=1`` to compile with XLA's defaults instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

_SUFFIX = ".jaxexport"
_settings: dict = {"exported_dir": None}
_programs: dict[str, Callable] = {}  # digest -> jitted call of a deserialised program, for this process


def enable_compilation_cache(directory: str | os.PathLike | None) -> Path | None:
  """Keeps compiled and traced programs in ``directory`` for the next process (opt-in).

  Sets JAX's persistent compilation cache to ``directory/xla`` (caching every program, however quick to
  compile) and stores the traced programs of :func:`shapjax.init_autoencoder` and :func:`shapjax.attribute` in
  ``directory/exported``. Call it before the first attribution; it also takes effect after earlier compiles.

  Args:
    directory: a folder (created if missing), or None to turn both caches off again.

  Returns:
    The resolved directory, or None.

  Raises:
    ValueError: the directory cannot be created or written.

  Example:
    >>> import shapjax
    >>> shapjax.enable_compilation_cache("~/.cache/shapjax")  # doctest: +SKIP
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  _programs.clear()
  if directory is None:
    _settings["exported_dir"] = None
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    return None
  root = Path(directory).expanduser().resolve()
  try:
    for sub in ("xla", "exported"):
      (root / sub).mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ValueError(f"compilation cache directory {str(root)!r} cannot be created: {error}") from None
  if not os.access(root / "exported", os.W_OK) or not os.access(root / "xla", os.W_OK):
    raise ValueError(f"compilation cache directory {str(root)!r} is not writable")
  jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()  # so the directory applies even after this process compiled something
  _settings["exported_dir"] = root / "exported"
  return root


def is_traced(args) -> bool:
  """Whether any leaf of ``args`` is a tracer, i.e. the call happens inside a ``jit`` (or grad, vmap, ...)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))


def top_level_on_cpu(args) -> bool:
  """Whether a program called on ``args`` is a top-level jit on the CPU backend (JAX takes compiler options only
  on a top-level jit)."""
  return not is_traced(args) and jax.default_backend() == "cpu"


def exported_programs_enabled(args) -> bool:
  """Whether :func:`call` would go through the exported-program cache (enabled, and no traced input)."""
  if _settings["exported_dir"] is None:
    return False
  return not is_traced(args)


def call(name: str, fn: Callable, args: tuple, static: dict, *, compiler_options: dict | None = None):
  """``jax.jit(fn)(*args, **static)`` through the exported-program cache.

  Args:
    name: the program's name (part of the file name).
    fn: a traceable function of ``*args`` and keyword-only ``**static``; its inputs and outputs must be pytrees
      of JAX's built-in containers (tuple, list, dict, None) so that ``jax.export`` can store their structure.
    args: concrete arrays (pytrees of built-in containers).
    static: hashable settings with a stable ``repr`` (part of the cache key).
    compiler_options: XLA compiler options for the executable (part of XLA's own cache key).

  Returns:
    What ``fn`` returns.
  """
  digest = _digest(name, args, static, compiler_options)
  program = _programs.get(digest)
  if program is None:
    exported = _load(name, digest, args)
    if exported is None:
      exported = jax.export.export(jax.jit(functools.partial(fn, **static)))(*args)
      _store(_path(name, digest), exported.serialize())
    program = _programs[digest] = jax.jit(exported.call, compiler_options=compiler_options)
  return program(*args)


def key_parts(key: jax.Array) -> tuple[jax.Array, str | None]:
  """A PRNG key as ``(uint32 key data, implementation name)``; a raw ``uint32`` key comes back as is, None."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key), str(jax.random.key_impl(key))
  return key, None


def wrap_key(data: jax.Array, impl: str | None) -> jax.Array:
  """The inverse of :func:`key_parts`, inside the traced program."""
  return data if impl is None else jax.random.wrap_key_data(data, impl=impl)


def _path(name: str, digest: str) -> Path:
  return _settings["exported_dir"] / f"{name}-{digest[:32]}{_SUFFIX}"


def _load(name: str, digest: str, args: tuple):
  path = _path(name, digest)
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return None
  except OSError as error:
    warnings.warn(f"cannot read exported program {path} ({error}); tracing it again", stacklevel=3)
    return None
  try:
    exported = jax.export.deserialize(bytearray(data))
    if [(a.shape, a.dtype) for a in exported.in_avals] != [(np.shape(x), x.dtype) for x in jax.tree.leaves(args)]:
      raise ValueError("its inputs do not match")
  except Exception as error:  # pylint: disable=broad-except  (a corrupt file: flatbuffers raises many kinds)
    warnings.warn(f"ignoring unreadable exported program {path} ({type(error).__name__}: {error}); tracing it "
                  "again", stacklevel=3)
    return None
  return exported


def _store(path: Path, data: bytes) -> None:
  """Writes ``data`` whole or not at all (a temporary file renamed into place); a failure is only a warning."""
  try:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as handle:
      handle.write(data)
    os.replace(handle.name, path)
  except OSError as error:
    warnings.warn(f"cannot write exported program {path} ({error}); it will be traced again next time",
                  stacklevel=3)
    try:
      os.unlink(handle.name)
    except (OSError, NameError):
      pass


def _digest(name: str, args: tuple, static: dict, compiler_options: dict | None) -> str:
  leaves, treedef = jax.tree.flatten(args)
  avals = [(np.shape(x), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves]
  parts = [name, str(treedef), repr(avals), repr(sorted(static.items())), repr(sorted((compiler_options or {}).items())),
           _environment()]
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _environment() -> str:
  """Everything outside the call that changes the traced program."""
  return "|".join([_versions(), jax.default_backend(), str(jax.config.jax_enable_x64),
                   str(jax.config.jax_default_matmul_precision), str(jax.config.jax_default_prng_impl),
                   str(jax.config.jax_threefry_partitionable)])


@functools.cache
def _versions() -> str:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  source = hashlib.sha256()
  for path in sorted(Path(__file__).parent.glob("*.py")):
    source.update(path.name.encode())
    source.update(path.read_bytes())
  return f"jax {jax.__version__} jaxlib {jaxlib.__version__} flax {flax.__version__} shapjax {source.hexdigest()}"


# --------------------------------------------------------------------------------------------------------------
# XLA options of the forward-only programs.

# YNNPACK fusions of convolutions and of element-wise ops (XLA:CPU's default fuses the convolutions alone): the bias,
# ReLU, compositing and loss then run inside YNNPACK instead of as separate passes over each activation. Forward
# pass + loss at batch 16 on one thread 148 -> 105 ms, attribution 1.3-1.4x; no gain for a training step (not used
# there). Same values to float rounding (tests/test_compilation.py).
_CPU_FORWARD_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_ELTWISE"}


def forward_options(args) -> dict | None:
  """The XLA options for a forward-only program called on ``args`` at top level, or None for XLA's defaults.

  None inside a user's ``jit`` (JAX takes compiler options only on a top-level jit), on backends other than
  CPU, with ``SHAPJAX_XLA_DEFAULTS`` set, and for a jaxlib that does not know the options.
  """
  if os.environ.get("SHAPJAX_XLA_DEFAULTS", "") not in ("", "0") or not top_level_on_cpu(args):
    return None
  if not _options_supported(tuple(sorted(_CPU_FORWARD_OPTIONS.items()))):
    return None
  return dict(_CPU_FORWARD_OPTIONS)


@functools.cache
def _options_supported(options: tuple) -> bool:
  """Whether this jaxlib compiles a trivial program with ``options`` (they are experimental XLA flags)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
  except Exception:  # pylint: disable=broad-except  (JaxRuntimeError "No such compile option", or a bad value)
    return False
  return True


def jit_forward(fn: Callable | None = None, *, static_argnames: tuple = ()):
  """``jax.jit`` for a forward-only program: called at top level on CPU, it compiles with the options of
  :func:`forward_options`; inside a user's ``jit`` or elsewhere it is the plain ``jax.jit(fn)``.

  Usable as ``@jit_forward`` or ``@functools.partial(jit_forward, static_argnames=...)``. ``.lower`` is the plain
  jit's (for inspecting the program); ``._cache_size()`` counts the compilations of every variant.
  """
  if fn is None:
    return functools.partial(jit_forward, static_argnames=static_argnames)
  static_argnames = tuple(static_argnames)
  variants = {None: jax.jit(fn, static_argnames=static_argnames)}  # options (sorted items) -> jitted fn

  @functools.wraps(fn)
  def call(*args, **kwargs):
    options = forward_options((args, {k: v for k, v in kwargs.items() if k not in static_argnames}))
    key = None if options is None else tuple(sorted(options.items()))
    jitted = variants.get(key)
    if jitted is None:
      jitted = variants[key] = jax.jit(fn, static_argnames=static_argnames, compiler_options=options)
    return jitted(*args, **kwargs)

  call.lower = variants[None].lower
  call._variants = variants  # pylint: disable=protected-access
  call._cache_size = lambda: sum(jitted._cache_size() for jitted in variants.values())  # pylint: disable=protected-access
  return call
