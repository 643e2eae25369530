"""What the command-line programs (train, evaluate, generate, convert) share: checkpoint loading with config
overrides, and user errors reported as one ``error: …`` line (no traceback) with a non-zero exit code.

A *user error* is a problem with the command line, the config, the data or a checkpoint — something the user
fixes: ``UserError``, ``records.DataError``, ``tokenizer.VocabularyMismatchError``, ``checkpointing.
CheckpointError``, ``convert.ConversionError``, ``models.UnknownSystemError``, ``system.BatchFieldError``, a
missing file, and the ``ValueError`` s that config validation raises. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import ast
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A problem with the command line or its files; printed without a traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception types reported as one ``error:`` line."""
  from input_pipeline import records, tokenizer  # pylint: disable=g-import-not-at-top
  from rrg_jax import checkpointing, convert  # pylint: disable=g-import-not-at-top
  from rrg_jax.models import system  # pylint: disable=g-import-not-at-top

  return (UserError, records.DataError, tokenizer.VocabularyMismatchError, checkpointing.CheckpointError,
          convert.ConversionError, system.BatchFieldError, FileNotFoundError, ValueError)


def error_line(e: BaseException) -> str:
  """``error: <message>`` on one line (a multi-line message, e.g. a converter's key list, keeps its lines)."""
  msg = str(e).strip() or type(e).__name__
  return f"error: {msg}"


def run_main(fn: Callable[[], Any]) -> int:
  """Runs ``fn``; a user error prints ``error_line`` to stderr and returns ``EXIT_USER_ERROR``, else 0."""
  try:
    fn()
  except user_errors() as e:
    print(error_line(e), file=sys.stderr)
    return EXIT_USER_ERROR
  return 0


# --- config overrides ----------------------------------------------------------------------------------------

def _parse_value(raw: str, current: Any) -> Any:
  if isinstance(current, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true/false, got {raw!r}")
  if isinstance(current, str) or current is None:
    return raw
  value = ast.literal_eval(raw)
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, (list, tuple)):
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
  elif not isinstance(value, type(current)):
    raise ValueError(f"expected {type(current).__name__}, got {raw!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """``["--config.a.b=v", ...]`` applied to existing keys only (typed like the current value)."""
  for item in overrides:
    key, sep, raw = item[len("--config."):].partition("=")
    if not sep:
      raise UserError(f"{item}: expected --config.KEY=VALUE.")
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        hint = difflib.get_close_matches(part, siblings, n=1)
        raise UserError(f"{item}: unknown config key {'.'.join(parts[:depth + 1])!r}"
                        + (f' (did you mean "{hint[0]}"?)' if hint else "") + ".")
      if depth < len(parts) - 1:
        node = node[part]
    try:
      node[parts[-1]] = _parse_value(raw, node[parts[-1]])
    except (ValueError, SyntaxError) as e:
      raise UserError(f"{item}: {e}") from None
  return config


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(``--config.*`` items, the other arguments)."""
  over = [a for a in argv if a.startswith("--config.")]
  return over, [a for a in argv if not a.startswith("--config.")]


def load_checkpoint(path: str, overrides: Sequence[str] = ()):
  """(system built from the checkpoint's config with overrides, variables, tokenizer) of an inference
  checkpoint or training workdir of any registered system."""
  from rrg_jax import checkpointing, models  # pylint: disable=g-import-not-at-top

  config, variables, tokenizer = checkpointing.load_inference(path)
  config = apply_overrides(config, overrides)
  return models.get_system(config), variables, tokenizer
