"""Model checkpoints for inference: the format shared by ``convert``, ``train``, ``evaluate`` and ``generate``.

An *inference checkpoint* is a directory::

    DIR/config.json      the resolved ml_collections config (JSON)
    DIR/vocab.json       the vocabulary: a word tokenizer's (input_pipeline.tokenizer.Tokenizer.save) or a subword
                         tokenizer's descriptor beside DIR/tokenizer.json (input_pipeline.subword)
    DIR/variables/       Orbax checkpoint of {"params": ..., "batch_stats": ...}

A *training workdir* holds ``config.json`` + ``vocab.json`` at its top, its resumable train states under
``DIR/checkpoints/`` (see ``rrg_jax.train``) and the best model, exported as an inference checkpoint, under
``DIR/best/``. ``load_inference`` accepts either kind of directory.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
VARIABLES_DIR = "variables"
BEST_DIR = "best"


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, incomplete or does not match the config."""


def write_config(directory: str | pathlib.Path, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Writes the resolved config as ``DIR/config.json``; returns the path."""
  path = pathlib.Path(directory) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  return path


def read_config(directory: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Reads ``DIR/config.json`` back into a ConfigDict (tuples come back as lists)."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{path} not found: {directory} is not an rrg_jax checkpoint directory.")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def save_inference(directory: str | pathlib.Path, config: ml_collections.ConfigDict,
                   variables: dict[str, Any], tokenizer) -> pathlib.Path:
  """Writes config, vocabulary and model variables as an inference checkpoint at ``directory``.

  Multi-process: every process must call it (the variables are written collectively); process 0 alone writes
  the config and vocabulary."""
  import jax  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    write_config(directory, config)
    tokenizer.save(directory / VOCAB_FILE)
  target = directory / VARIABLES_DIR
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, dict(variables), force=True)
  return directory


def resolve_inference_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A training workdir resolves to its ``best/`` export; an inference checkpoint to itself."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"Checkpoint {path} does not exist.")
  if (path / VARIABLES_DIR).is_dir():
    return path
  if (path / BEST_DIR / VARIABLES_DIR).is_dir():
    return path / BEST_DIR
  raise CheckpointError(
      f"{path} holds no model: expected {path / VARIABLES_DIR} (converted/exported checkpoint) or "
      f"{path / BEST_DIR / VARIABLES_DIR} (training workdir with a best checkpoint).")


def _restore_on_host(path: pathlib.Path) -> Any:
  """An Orbax pytree as host numpy arrays, whatever device topology saved it (a run trained on every CPU core as a
  device is read by a 1-device evaluate / generate)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_inference(path: str | pathlib.Path):
  """Loads ``(config, variables, tokenizer)`` from an inference checkpoint or a training workdir."""
  from input_pipeline import subword  # the input pipeline owns the vocabulary formats (word or subword)

  directory = resolve_inference_dir(path)
  config = read_config(directory)
  vocab = directory / VOCAB_FILE
  if not vocab.is_file():
    raise CheckpointError(f"{vocab} not found: the checkpoint has no vocabulary.")
  tokenizer = subword.load_tokenizer(vocab)
  variables = _restore_on_host(directory / VARIABLES_DIR)
  if int(config.model.vocab_size) != tokenizer.vocab_size:
    raise CheckpointError(
        f"{directory}: config vocab_size {config.model.vocab_size} != vocabulary size "
        f"{tokenizer.vocab_size} in {vocab}.")
  return config, variables, tokenizer


# --- resumable training state ---------------------------------------------------------------------------

TRAIN_CHECKPOINTS_DIR = "checkpoints"


class TrainCheckpointer:
  """Orbax ``CheckpointManager`` over ``WORKDIR/checkpoints/<step>/`` with three items per step:

  ``state``  the train state pytree (params, batch_stats, opt_state, step, rng), restored with its shardings;
  ``data``   the Grain train iterator position (``grain.checkpoint``: one JSON per process);
  ``meta``   JSON loop bookkeeping (epoch, batches done in the epoch, best score, early-stop counter, ...).

  Saves are asynchronous (the next save / ``wait`` / ``close`` waits for the previous one); a step is only
  listed once Orbax has finalised it, so a run killed mid-write resumes from the previous step.
  """

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int | None = 3, async_save: bool = True):
    import grain  # the data-iterator item

    self._grain = grain
    self.directory = pathlib.Path(workdir).absolute() / TRAIN_CHECKPOINTS_DIR
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, meta: dict[str, Any]) -> None:
    """Starts saving ``step`` (returns once the arrays are copied to host; the write runs in background)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=self._grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore_meta(self, step: int) -> dict[str, Any]:
    return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
    """Restores the state (shapes, dtypes and shardings of ``abstract_state``) and moves ``data_iterator``
    to the saved position in place; returns the state."""
    if step not in self._manager.all_steps():
      raise CheckpointError(f"No train checkpoint for step {step} in {self.directory}.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=self._grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# --- staged training ------------------------------------------------------------------------------------------

def _in_subtree(path: str, prefix: str) -> bool:
  return prefix == "" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def init_from(variables: dict[str, Any], path: str | pathlib.Path, take: tuple[str, ...]) -> dict[str, Any]:
  """Staged training (``config.train.init_from``): ``variables`` with subtrees copied from the model of ``path``
  (an inference checkpoint, or a training workdir's ``best/``).

  ``take`` entries are parameter-path prefixes (``"visual_extractor"``; ``""`` = everything) copied to the same
  place, or ``"dst=src"`` to copy the checkpoint's subtree ``src`` into ``dst``; params and batch statistics alike.
  Every parameter an entry covers must exist in the checkpoint with the same shape: one ``CheckpointError`` lists
  every missing or mis-shaped one (and an entry that covers nothing).
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  _, source, _ = load_inference(path)
  new, problems = {}, []
  covered = {entry: False for entry in take}
  for collection in ("params", "batch_stats"):
    dst_flat = traverse_util.flatten_dict(dict(variables.get(collection, {})), sep="/")
    src_flat = traverse_util.flatten_dict(dict(source.get(collection, {}) or {}), sep="/")
    for key, value in dst_flat.items():
      for entry in take:
        dst, _, src = entry.partition("=")
        src = src if "=" in entry else dst
        if not _in_subtree(key, dst):
          continue
        covered[entry] = True
        rel = key[len(dst.rstrip("/")):] if dst else "/" + key
        src_key = (src.rstrip("/") + rel).lstrip("/")
        if src_key not in src_flat:
          problems.append(f"{collection}/{key}: the checkpoint has no {collection}/{src_key}")
        elif np.shape(src_flat[src_key]) != np.shape(value):
          problems.append(f"{collection}/{key} {np.shape(value)}: the checkpoint's {collection}/{src_key} is "
                          f"{np.shape(src_flat[src_key])}")
        else:
          dst_flat[key] = np.asarray(src_flat[src_key], np.asarray(value).dtype)
        break
    new[collection] = traverse_util.unflatten_dict(dst_flat, sep="/")
  problems += [f"take entry {entry!r} covers no parameter of the model" for entry, hit in covered.items() if not hit]
  if problems:
    raise CheckpointError(f"config.train.init_from={str(path)!r} does not fit the model:\n  " + "\n  ".join(problems))
  return {**variables, **new}
