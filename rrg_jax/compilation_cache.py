"""Persistent XLA compilation cache for the command-line tools (train, evaluate, generate).

Compiling a CAMANet train step takes minutes on a CPU; with the cache a second run of the same config loads the
compiled programs from disk instead (JAX's persistent compilation cache, keyed on the program, the compile options
and the backend, so a changed model, batch shape, device count or JAX version compiles afresh).

Where it lives, first match wins:
  1. ``JAX_COMPILATION_CACHE_DIR`` (JAX's own variable) or a directory already set with
     ``jax.config.update("jax_compilation_cache_dir", ...)``: used as it is;
  2. ``RRG_JAX_COMPILATION_CACHE``: a directory, or ``off`` to disable;
  3. the config's ``compilation_cache`` (train): a directory, ``off``, or ``default``;
  4. ``default``: ``~/.cache/rrg_jax/xla`` (``$XDG_CACHE_HOME/rrg_jax/xla`` when that is set).
Programs that compile in under a second are not stored (JAX's ``jax_persistent_cache_min_compile_time_secs``).
"""

from __future__ import annotations

import os
import pathlib

import jax

ENV = "RRG_JAX_COMPILATION_CACHE"
OFF = "off"
DEFAULT = "default"


def default_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "rrg_jax" / "xla"


def enable(setting: str = DEFAULT) -> pathlib.Path | None:
  """Switches the persistent cache on (see the module docstring for the order of the settings); returns the
  directory in use, or None when it is off. Call before the first compilation."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return pathlib.Path(current)
  setting = os.environ.get(ENV) or setting or DEFAULT
  if setting == OFF:
    return None
  directory = default_dir() if setting == DEFAULT else pathlib.Path(setting).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  return directory
