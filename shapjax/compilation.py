"""Compiled programs that outlive the process: JAX's persistent compilation cache.

JAX's persistent compilation cache keeps XLA's compiled executables on disk, so a new process skips XLA's
compilation of every program it has seen before (tracing and lowering still run, about 1 s for ``attribute`` on
a 128x128x3 image). As with JAX's own cache, the directory is trusted: do not share it with users you do not
trust.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(directory: str | os.PathLike | None) -> Path | None:
  """Keeps the compiled programs in ``directory`` for the next process (opt-in).

  Sets JAX's persistent compilation cache to ``directory``, caching every program however quick to compile.
  It takes effect also after earlier compiles of this process.

  Args:
    directory: a folder (created if missing), or None to turn the cache off again.

  Returns:
    The resolved directory, or None.

  Raises:
    ValueError: the directory cannot be created or written (the message names it).

  Example:
    >>> import shapjax
    >>> shapjax.enable_compilation_cache("~/.cache/shapjax")  # doctest: +SKIP
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  if directory is None:
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    return None
  root = Path(directory).expanduser().resolve()
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ValueError(f"compilation cache directory {str(root)!r} cannot be created: {error}") from None
  if not os.access(root, os.W_OK):
    raise ValueError(f"compilation cache directory {str(root)!r} is not writable")
  jax.config.update("jax_compilation_cache_dir", str(root))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()  # so the directory applies even after this process compiled something
  return root
