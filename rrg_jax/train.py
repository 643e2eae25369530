r"""Training CLI: config → tokenizer → mesh → model/optimiser state → jitted sharded loop → evaluation → Orbax.

    python -m rrg_jax.train --config=configs/camanet.py          # embedded sample, CPU; workdir checkpoints/camanet_sample
    python -m rrg_jax.train --config=configs/camanet.py:iu_xray --workdir=checkpoints/iu \
        --config.data.data_dir=/data/iu_xray --config.optim.lr_ed=1e-3                    # official IU recipe

The config is locked: overriding a key that does not exist is an error. The workdir receives

    config.json, vocab.json   the resolved config (vocab_size filled in) and the vocabulary
    checkpoints/<step>/       resumable train states (Orbax: state + Grain iterator + loop bookkeeping),
                              saved every epoch, every ``train.checkpoint_every_steps`` steps and on SIGTERM
    best/                     inference checkpoint of the best epoch (``checkpointing.load_inference``)
    metrics.jsonl             one JSON row per logged train step and per epoch (val/test scores)
    tensorboard/              TensorBoard events (tensorboardX)
    curves.png                loss parts per step and val/test BLEU per epoch (``rrg_jax.curves``)
    reports/<split>_epochNNN.jsonl  each epoch's generated reports (id, reference, generated, findings)
    plots/<split>_epochNNN_*.png    each epoch's evaluator pictures, if any (``classification``: roc, confusion)

Re-running the same command resumes from the latest checkpoint with the exact next batch. Any registered system
(``config.model.name``; ``python -m rrg_jax.models`` lists them) trains through the same loop: the system gives the
model, batch fields, loss and decoder (``rrg_jax.models.system``); the config gives the optimiser groups and
schedule, staged initialisation (``train.init_from``), the evaluators and the model-selection score.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import math
import pathlib
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rrg_jax import checkpointing, cli, compilation_cache, curves, optim, sharding
from rrg_jax import train_state as ts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/camanet.py:iu_xray.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, checkpoints, metrics and the best model "
                                "(default: checkpoints/<model>_<preset>, see default_workdir).")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORTS_DIR = "reports"
PLOTS_DIR = "plots"
CURVES_FILE = "curves.png"


class NonFiniteLossError(FloatingPointError):
  """The loss or a gradient became NaN/inf; training stopped before saving the bad state."""


def default_workdir(config: ml_collections.ConfigDict) -> str:
  """``checkpoints/<model name>_<preset>`` (relative to the current directory), e.g. ``checkpoints/camanet_sample``."""
  return str(pathlib.Path("checkpoints") / f"{config.model.name}_{config.get('preset', 'custom')}")


# --- model selection and early stopping ----------------------------------------------------------------------

def selection_score(row: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
  """``Σ weight · row[key]`` over ``config.train.selection`` (CAMANet: ``val_BLEU_4 + 0.5 · val_BLEU_1``, R2Gen:
  ``val_BLEU_4``, RadGen: ``val_macro_auc``; a weight 0 leaves its key out). An undefined score (None, e.g. the AUC
  of a class absent from the split) makes it NaN, which never improves (radgen_spec §5.4)."""
  missing = [k for k in weights if k not in row]
  if missing:
    raise ValueError(f"config.train.selection uses {missing}, which the epoch's scores do not have (they have "
                     f"{sorted(k for k in row if k.startswith(('val_', 'test_')))}).")
  return float(sum(float(w) * (math.nan if row[k] is None else float(row[k])) for k, w in weights.items() if w))


@dataclasses.dataclass(frozen=True)
class Selection:
  """Best score so far (None before the first evaluation) and consecutive non-improving epochs."""
  best_score: float | None = None
  bad_epochs: int = 0

  def update(self, score: float, early_stop: int, ties_improve: bool = False,
             min_delta: float = 0.0) -> tuple[Selection, bool, bool]:
    """Returns ``(new selection, improved, stop)`` (camanet_spec §8, radgen_spec §5.4).

    The first evaluation always improves. Later, ``score`` improves iff ``score > best + min_delta`` (``>=`` with
    ``ties_improve``: R2Gen's ``>=``); a NaN score never does. A NaN first score is the best (its model is kept)
    until any non-NaN score replaces it. Stop once the non-improvement counter exceeds ``early_stop``, i.e. after
    the (early_stop+1)-th non-improving epoch in a row: a patience "stop when the counter reaches P" (RadGen's
    P = 10) is ``early_stop = P − 1``.
    """
    best = self.best_score
    if best is None or (not math.isnan(score) and (
        math.isnan(best) or (score >= best + min_delta if ties_improve else score > best + min_delta))):
      return Selection(score, 0), True, False
    bad = self.bad_epochs + 1
    return Selection(best, bad), False, bad > early_stop


# --- loop bookkeeping ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
  """Where the loop is; saved as the ``meta`` item of every train checkpoint."""
  epoch: int = 0            # 0-based epoch being trained (== epochs done when batches_done == 0)
  batches_done: int = 0     # batches of ``epoch`` already trained on
  best_score: float | None = None
  bad_epochs: int = 0
  best_epoch: int | None = None
  early_stopped: bool = False
  loss_sums: dict[str, float] = dataclasses.field(default_factory=dict)  # this epoch's loss parts so far,
  loss_steps: int = 0                                                     # so a resumed epoch averages them all

  def done(self, config: ml_collections.ConfigDict) -> bool:
    return self.early_stopped or self.epoch >= config.train.epochs

  @property
  def selection(self) -> Selection:
    return Selection(self.best_score, self.bad_epochs)


class MetricsLogger:
  """Appends rows to ``WORKDIR/metrics.jsonl`` and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self.enabled = enabled
    self._path = workdir / METRICS_FILE
    self._writer = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._writer = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR))

  def write(self, step: int, row: Mapping[str, Any], prefix: str) -> None:
    """One JSON row (undefined values — None, NaN, ±inf — as null) and its numbers as TensorBoard scalars."""
    if not self.enabled:
      return
    from rrg_jax import evaluators  # pylint: disable=g-import-not-at-top

    row = evaluators.json_row(row)
    with self._path.open("a") as f:
      f.write(json.dumps({"kind": prefix, "step": step, **row}, sort_keys=True) + "\n")
    for k, v in row.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self._writer.add_scalar(f"{prefix}/{k}", v, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls after each step (checkpoint, then exit).

  Multi-process, ``any_process()`` asks every process after each step (a few bytes through the collectives), so
  a SIGTERM reaching one process, or several at different steps, stops all of them at the same step: the
  checkpoint save is collective.
  """

  def __init__(self):
    self.raised = False
    self._previous = None

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.raised
    return bool(multihost_utils.process_allgather(np.asarray(self.raised)).any())

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


# --- set-up -------------------------------------------------------------------------------------------------

def _load_or_build_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """A resumed run reuses ``WORKDIR/vocab.json`` (after checking it against the data's report tokenizer); a fresh
  one builds it (``loader.build_tokenizer``: the train split's vocabulary or ``data.report_tokenizer``) and saves
  it."""
  from input_pipeline import loader, subword  # pylint: disable=g-import-not-at-top

  vocab = workdir / checkpointing.VOCAB_FILE
  if vocab.is_file():
    tokenizer = subword.load_tokenizer(vocab)  # a word vocabulary or a subword tokenizer's descriptor
    loader.check_tokenizer(config, tokenizer, f"the vocabulary {vocab} of the run being resumed")
    return tokenizer
  tokenizer = loader.build_tokenizer(config)
  if jax.process_index() == 0:
    tokenizer.save(vocab)
  return tokenizer


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class _Throughput:
  """Examples per second since the first step after (re)start or evaluation (excludes compilation)."""

  def __init__(self, global_batch: int):
    self.global_batch = global_batch
    self.reset()

  def reset(self) -> None:
    self._t0, self._steps = None, 0

  def tick(self) -> float:
    if self._t0 is None:
      self._t0 = time.perf_counter()
      return 0.0
    self._steps += 1
    return self._steps * self.global_batch / max(time.perf_counter() - self._t0, 1e-9)


def scored_epoch(t: ml_collections.ConfigDict, epoch: int) -> bool:
  """Whether the 1-based ``epoch`` scores ``t.eval_splits``: every ``t.eval_every_epochs``-th and the last (model
  selection and early stopping see only these)."""
  every = int(t.get("eval_every_epochs", 1))
  if every < 1:
    raise ValueError(f"config.train.eval_every_epochs={every}: must be at least 1 (score every N-th epoch).")
  return epoch % every == 0 or epoch == int(t.epochs)


def _select(progress: Progress, row: dict[str, Any], t: ml_collections.ConfigDict) -> tuple[Progress, bool]:
  """Applies model selection / early stopping (``config.train``) to the epoch's scores; adds the outcome to
  ``row``."""
  score = selection_score(row, dict(t.selection))
  selection, improved, stop = progress.selection.update(score, int(t.early_stop), bool(t.selection_ties_improve),
                                                        float(t.get("selection_min_delta", 0.0)))
  progress = dataclasses.replace(progress, best_score=selection.best_score, bad_epochs=selection.bad_epochs,
                                 early_stopped=stop,
                                 best_epoch=progress.epoch if improved else progress.best_epoch)
  row.update(score=score, improved=improved, best_score=progress.best_score, best_epoch=progress.best_epoch,
             bad_epochs=progress.bad_epochs)
  return progress, improved


# --- training -----------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Progress:
  """Trains (or resumes) in ``workdir``; returns the final loop progress. See the module docstring."""
  from input_pipeline import features, loader  # pylint: disable=g-import-not-at-top
  from rrg_jax import evaluate, evaluators, models  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0

  tokenizer = _load_or_build_tokenizer(config, workdir)
  config.model.vocab_size = tokenizer.vocab_size
  features.prepare(config, workdir, tokenizer)  # e.g. train + save a text tokenizer the config's features need
  system = models.get_system(config)  # may fill derived config keys (System.__init__) before the config is written
  if main:
    checkpointing.write_config(workdir, config)
  evaluators.check(tuple(config.eval.evaluators))
  mesh = sharding.create_mesh(config.mesh_shape)
  sharding.check_batch_size(config.train.batch_size, mesh)
  train_ds = loader.train_dataset(config, tokenizer, seed=config.seed)
  steps_per_epoch = loader.steps_per_epoch(config)
  tx = optim.make_optimizer(config, steps_per_epoch)
  lr_schedules = optim.learning_rate_schedules(config, optim.updates_per_epoch(config, steps_per_epoch))

  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  repl = sharding.replicated(mesh)
  ckpt = checkpointing.TrainCheckpointer(workdir, max_to_keep=config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  variables = jax.jit(system.init, out_shardings=repl)(init_key)
  if latest is None:  # a fresh run: pretrained backbone, then staged initialisation (a resumed run restores)
    variables = jax.device_get(variables)
    variables = system.load_pretrained(variables)
    if config.train.init_from.checkpoint:
      variables = checkpointing.init_from(variables, config.train.init_from.checkpoint,
                                          tuple(config.train.init_from.take))
    variables = jax.device_put(variables, repl)
  state = jax.jit(lambda v, k: ts.create_train_state(v, tx, k), out_shardings=repl)(variables, dropout_key)
  del variables
  compiled: dict[frozenset[str], Any] = {}

  def train_step_of(epoch: int):
    """The jitted train step of ``epoch``: one program per set of frozen groups (``optim.frozen_epochs``), whose
    frozen parameters get no backward pass (radgen_spec §5.2)."""
    frozen = optim.frozen_groups(config, epoch)
    if frozen not in compiled:
      step = ts.make_train_step(system, tx, optim.without_gradient(config, frozen))
      compiled[frozen] = ts.jit_train_step(step, state, mesh, system.batch_fields())
    return compiled[frozen]

  data_iter = iter(train_ds)
  progress = Progress()
  if latest is not None:
    progress = Progress(**ckpt.restore_meta(latest))
    state = ckpt.restore(latest, _abstract(state), data_iter)
    logging.info("Resumed from %s at step %d (epoch %d, batch %d).", ckpt.directory / str(latest), latest,
                 progress.epoch + 1, progress.batches_done)

  metrics = MetricsLogger(workdir, main)
  speed = _Throughput(config.train.batch_size)

  def save(state: ts.TrainState, meta: Progress) -> None:
    ckpt.save(int(state.step), state, data_iter, dataclasses.asdict(meta))

  try:
    with _SigtermFlag() as sigterm:
      while not progress.done(config):
        epoch = progress.epoch
        bar = tqdm.tqdm(total=steps_per_epoch, initial=progress.batches_done, disable=not main,
                        desc=f"epoch {epoch + 1}/{config.train.epochs}", dynamic_ncols=True)
        train_step = train_step_of(epoch)
        while progress.batches_done < steps_per_epoch:
          batch = loader.to_global_batch(system.device_batch(next(data_iter)), mesh)
          if system.round_trip_fields:  # e.g. the report generated with the current parameters, re-tokenised
            batch.update(loader.to_global_batch(
                system.round_trip(state.variables(), batch, ts.round_trip_key(state)), mesh))
          state, m = train_step(state, batch)
          m = jax.device_get(m)
          step = int(state.step)
          if not bool(m.pop("finite")):
            ckpt.wait()
            raise NonFiniteLossError(
                f"Non-finite loss or gradient at step {step} (epoch {epoch + 1}, batch "
                f"{progress.batches_done + 1}): " + ", ".join(f"{k}={float(v):.4g}" for k, v in m.items())
                + f". Stopping without saving; the last good checkpoint is step {ckpt.latest_step()} in "
                f"{ckpt.directory}.")
          if started is not None:
            logging.info("First train step done %.1f s after start (set-up and compilation included).",
                         time.perf_counter() - started)
            started = None
          progress.batches_done += 1
          parts = {k: float(v) for k, v in m.items()}
          progress.loss_sums = {k: progress.loss_sums.get(k, 0.0) + v for k, v in parts.items()}
          progress.loss_steps += 1
          update = max(optim.update_count(config, steps_per_epoch, step) - 1, 0)  # the latest optimiser update
          lrs = {f"lr_{g}": float(schedule(update)) for g, schedule in lr_schedules.items()}
          rate = speed.tick()
          bar.set_postfix({**{k: f"{v:.3f}" for k, v in parts.items()},
                           **{k: f"{v:.1e}" for k, v in lrs.items()}, "ex/s": f"{rate:.1f}"}, refresh=False)
          bar.update(1)
          if step % config.train.log_every_steps == 0:
            metrics.write(step, {"epoch": epoch + 1, **parts, **lrs, "examples_per_s": rate}, "train")
          every = config.train.checkpoint_every_steps
          stop = sigterm.any_process()
          if stop or (every and step % every == 0 and progress.batches_done < steps_per_epoch):
            save(state, progress)
          if stop:
            ckpt.wait()
            logging.warning("SIGTERM: saved step %d in %s; rerun the same command to resume.", step,
                            ckpt.directory)
            return progress
        bar.close()

        row = {"epoch": epoch + 1,
               **{f"train_{k}": v / max(progress.loss_steps, 1) for k, v in progress.loss_sums.items()}}
        for split in config.train.eval_splits if scored_epoch(config.train, epoch + 1) else ():
          scores, reports = evaluate.evaluate_split(system, state.variables(), tokenizer,
                                                    loader.eval_batches(config, tokenizer, split), mesh=mesh,
                                                    progress=main, plot_dir=workdir / PLOTS_DIR,
                                                    plot_prefix=f"{split}_epoch{epoch + 1:03d}_")
          row.update({f"{split}_{k}": None if v is None else float(v) for k, v in scores.items()})
          if main:
            evaluate.write_reports(workdir / REPORTS_DIR / f"{split}_epoch{epoch + 1:03d}.jsonl", reports, config)
        progress = dataclasses.replace(progress, epoch=epoch + 1, batches_done=0, loss_sums={}, loss_steps=0)
        if any(k.startswith("val_") for k in row):
          progress, improved = _select(progress, row, config.train)
          if improved:
            checkpointing.save_inference(workdir / checkpointing.BEST_DIR, config, state.variables(), tokenizer)
        metrics.write(int(state.step), row, "epoch")
        if main:
          curves.plot_curves(workdir / METRICS_FILE, workdir / CURVES_FILE)
        logging.info("Epoch %d: %s", epoch + 1, json.dumps(row, sort_keys=True))
        if progress.early_stopped:
          logging.info("Early stopping: %d epochs in a row without improvement.", progress.bad_epochs)
        save(state, progress)
        speed.reset()
        if sigterm.any_process():
          return progress
  finally:
    ckpt.wait()
    ckpt.close()
    metrics.close()
  return progress


# --- evaluation protocols -----------------------------------------------------------------------------------

PROTOCOLS = ("single", "cv", "cv_inner_val", "stages")
CV_METRICS_FILE = "cv_metrics.json"


def best_epoch_row(workdir: pathlib.Path, best_epoch: int) -> dict[str, Any]:
  """The epoch row of ``best_epoch`` (1-based) in ``workdir/metrics.jsonl`` (the last one written for it)."""
  rows = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]
  found = [r for r in rows if r["kind"] == "epoch" and r["epoch"] == best_epoch]
  if not found:
    raise ValueError(f"{workdir / METRICS_FILE} has no row of epoch {best_epoch}.")
  return found[-1]


def cv_summary(folds: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-fold best-epoch scores → ``{"folds": [...], "mean": {...}, "std": {...}, "n": {...}}``: mean and
  population standard deviation (ddof 0) of each score over the folds where it is defined (radgen_spec §7)."""
  keys = sorted({k for f in folds for k, v in f["scores"].items() if isinstance(v, (int, float))})
  out: dict[str, Any] = {"folds": folds, "mean": {}, "std": {}, "n": {}}
  for k in keys:
    values = np.asarray([f["scores"][k] for f in folds if isinstance(f["scores"].get(k), (int, float))
                         and math.isfinite(f["scores"][k])], np.float64)
    out["n"][k] = int(values.size)
    out["mean"][k] = float(values.mean()) if values.size else None
    out["std"][k] = float(values.std()) if values.size else None
  return out


def stage_config(config: ml_collections.ConfigDict, stage: str, earlier: Mapping[str, Any] = ()
                 ) -> ml_collections.ConfigDict:
  """The config of ``stage`` of a staged run: ``config`` (without ``stages``) with ``config.stages[stage]``'s nested
  keys set on it, then the ``earlier`` stages' outputs (``System.after_stage``: dotted key → value) — every key must
  exist in the base config (a misspelt override is an error, as on the command line)."""
  out = config.copy_and_resolve_references()
  overrides = out.stages[stage]
  with out.unlocked():
    del out["stages"]

  def apply(node: ml_collections.ConfigDict, values: Mapping[str, Any], path: str) -> None:
    for key, value in values.items():
      if key not in node:
        raise ValueError(f"config.stages.{stage}.{path}{key}: no such key in the config.")
      if isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(node[key], ml_collections.ConfigDict):
        apply(node[key], value, f"{path}{key}.")
      else:
        node[key] = value

  apply(out, overrides, "")
  for dotted, value in dict(earlier).items():
    node = out
    *path, leaf = dotted.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return out


def run_protocol(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Progress:
  """``config.eval.protocol``: ``single`` trains once on the configured splits (with ``data.fold = k``: train on
  the other folds, select and report on fold k — radgen_spec §7's ``single_fold`` with k = 4); ``cv`` runs every
  fold k = 0..``data.num_folds``−1 in turn in ``WORKDIR/fold_k/`` (each resumable: the same command continues the
  unfinished fold) and writes the per-fold best-epoch val scores with their mean ± std to
  ``WORKDIR/cv_metrics.json``; ``cv_inner_val`` does the same with fold k + 1 as the early-stopping (val) fold and
  reports fold k's test scores of the best epoch (``data.inner_val``); ``stages`` trains the stages
  ``config.train.stages`` in order (CT-AGRG: pretrain → stage1 → stage2; ``config.stages.<s>`` their overrides),
  stage s in ``WORKDIR/<s>/`` with ``stage_config``, each started from the previous stage's best model
  (``train.init_from.checkpoint``; which parameters: the stage's ``train.init_from.take``) and given the previous
  stages' ``System.after_stage`` outputs (e.g. decision thresholds); each resumable, a finished stage is skipped.
  Returns the last fold's / stage's progress (not done after a SIGTERM)."""
  protocol = config.eval.get("protocol", "single")
  if protocol not in PROTOCOLS:
    raise ValueError(f"config.eval.protocol={protocol!r}; choose one of {PROTOCOLS}.")
  workdir = pathlib.Path(workdir).absolute()
  if protocol == "single":
    return train_and_evaluate(config, workdir)
  if protocol == "stages":
    return _run_stages(config, workdir)
  inner = protocol == "cv_inner_val"
  reported = "test_" if inner else "val_"
  folds = []
  for k in range(int(config.data.num_folds)):
    fold_config = config.copy_and_resolve_references()
    fold_config.data.fold = k
    fold_config.data.inner_val = inner
    if inner and "test" not in fold_config.train.eval_splits:
      fold_config.train.eval_splits = tuple(fold_config.train.eval_splits) + ("test",)
    fold_dir = workdir / f"fold_{k}"
    logging.info("Cross-validation fold %d/%d in %s", k + 1, config.data.num_folds, fold_dir)
    progress = train_and_evaluate(fold_config, fold_dir)
    if not progress.done(fold_config):
      return progress
    row = best_epoch_row(fold_dir, progress.best_epoch)
    folds.append({"fold": k, "best_epoch": progress.best_epoch,
                  "scores": {key: v for key, v in row.items() if key.startswith(reported)}})
  if jax.process_index() == 0:
    summary = cv_summary(folds)
    (workdir / CV_METRICS_FILE).write_text(json.dumps({"protocol": protocol, **summary}, indent=1, sort_keys=True))
    logging.info("Cross-validation: %s", json.dumps({k: summary["mean"][k] for k in sorted(summary["mean"])}))
  return progress


def protocol_finished(config: ml_collections.ConfigDict, progress: Progress) -> bool:
  """Whether ``run_protocol`` ran to its end: its last run's ``progress`` is done under that run's config (a staged
  run's last stage has its own epochs)."""
  if config.eval.get("protocol", "single") == "stages":
    config = stage_config(config, config.train.stages[-1])
  return progress.done(config)


def _run_stages(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Progress:
  from rrg_jax import models  # pylint: disable=g-import-not-at-top

  outputs: dict[str, Any] = {}
  previous = None
  for stage in config.train.stages:
    stage_dir = workdir / stage
    cfg = stage_config(config, stage, outputs)
    if previous is not None and cfg.train.init_from.take:
      cfg.train.init_from.checkpoint = str(previous)
    logging.info("Stage %s in %s", stage, stage_dir)
    progress = train_and_evaluate(cfg, stage_dir)
    if not progress.done(cfg):
      return progress
    outputs.update(models.get_system(cfg).after_stage(stage_dir))
    previous = stage_dir
  return progress


class _QuietOrbax:
  """Drops Orbax's per-save INFO lines from the absl log (warnings and errors still pass)."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; an unknown ``--config.*`` key (the config is locked) becomes a one-line error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"FATAL Flags parsing error: {e}") from None
  except (AttributeError, KeyError) as e:
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    raise SystemExit(f"FATAL Flags parsing error: unknown config key in a --config.* override: {msg}") from None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/camanet.py or configs/camanet.py:iu_xray.")
  workdir = _WORKDIR.value or default_workdir(_CONFIG.value)
  logging.get_absl_logger().addFilter(_QuietOrbax())
  try:
    cpu_devices = sharding.use_cpu_cores(_CONFIG.value.train.batch_size)
    sharding.initialize_distributed()
    if cpu_devices is not None:
      logging.info("CPU devices per process: %d (RRG_JAX_CPU_DEVICES to change)", cpu_devices)
    cache = compilation_cache.enable(_CONFIG.value.get("compilation_cache", compilation_cache.DEFAULT))
    logging.info("XLA compilation cache: %s", cache or "off")
    logging.info("Workdir: %s", pathlib.Path(workdir).absolute())
    progress = run_protocol(_CONFIG.value, workdir)
  except NonFiniteLossError as e:
    logging.error("%s", e)
    raise SystemExit(cli.error_line(e)) from None
  except cli.user_errors() as e:  # bad data, config or checkpoint: one line, no traceback
    raise SystemExit(cli.error_line(e)) from None
  if not protocol_finished(_CONFIG.value, progress):  # stopped by SIGTERM after checkpointing
    raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
