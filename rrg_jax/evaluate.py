r"""Evaluation: decode a split with the system's decoder and score it with its configured evaluators.

    python -m rrg_jax.evaluate --checkpoint DIR [--split test] [--workdir OUT] [--config.data.data_dir=...]

``DIR`` is a training workdir (its ``best/`` model) or an inference checkpoint (``rrg_jax.convert``,
``checkpointing.save_inference``) of any registered system. The checkpoint's config is used; ``--config.KEY=VALUE``
overrides existing keys (e.g. the data location, ``decode.cached``, ``train.batch_size``,
``train.max_eval_examples``, ``eval.evaluators``). ``OUT`` (default: ``DIR/eval_<split>``) receives
``metrics.json`` (the scores; undefined ones as null), ``reports.jsonl`` (one row per record: ``id``,
``reference``, ``generated`` and, for systems with a classifier, ``probabilities`` {class: p} and
``predicted_findings`` (p ≥ 0.5), or ``prediction`` for a single-label classifier) and the evaluators' pictures (``classification``: ``roc.png``,
``confusion.png``).

Scores: those of ``config.eval.evaluators`` (``rrg_jax.evaluators``): ``report_text`` (BLEU_1..4, METEOR,
ROUGE_L, Cider, sacreBLEU), ``clinical_efficacy`` (CE_*), ``multilabel_classification`` (CLS_*),
``classification`` (accuracy, macro_auc, auc_*, macro_f1, f1_*, sensitivity_*, specificity_*, precision_*,
confusion_*).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from rrg_jax import checkpointing, cli, compilation_cache, evaluators, sharding
from rrg_jax.evaluators.classification import THRESHOLD
from rrg_jax.metrics import clinical

METRICS_FILE = "metrics.json"
REPORTS_FILE = "reports.jsonl"
_ID_BYTES = 256


# --- class names ----------------------------------------------------------------------------------------------

def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """Names of the ``config.model.num_classes`` classifier outputs: ``config.data.class_names`` when set, the
  single-label class map's names (``config.data.label_mode = "single"``), the 14 CheXpert observations for 14
  classes, else the ``classes`` of the data's labels.json, else ``class_<i>``."""
  from input_pipeline import loader, records  # pylint: disable=g-import-not-at-top

  n = loader.num_classes(config)
  names = list(config.data.get("class_names", None) or ())
  if not names and loader.single_label(config):
    names = [name for name, _ in loader.class_map(config)]
  if not names and n == len(clinical.OBSERVATIONS):
    names = list(clinical.OBSERVATIONS)
  if not names and config.data.get("labels", ""):
    path = records.resolve_data_dir(config.data.data_dir) / config.data.labels
    try:
      names = list(records.read_labels(path)[0] or ())
    except records.DataError:
      names = []
  if len(names) != n:
    names = [f"class_{i}" for i in range(n)]
  return names


# --- evaluation library ---------------------------------------------------------------------------------------

def _gather(x: Any) -> np.ndarray:
  """A global jax.Array or a host-local numpy array (rows of this process) → all rows, on every process."""
  if isinstance(x, jax.Array) or jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _gather_ids(ids: Sequence[str]) -> list[str]:
  if jax.process_count() == 1:
    return list(ids)
  raw = np.zeros((len(ids), _ID_BYTES), np.uint8)
  for i, s in enumerate(ids):
    b = s.encode()[:_ID_BYTES]
    raw[i, :len(b)] = np.frombuffer(b, np.uint8)
  return [bytes(r).rstrip(b"\0").decode() for r in _gather(raw)]


def evaluate_split(system, variables: Any, tokenizer, batches: Iterable[Mapping[str, Any]], *,
                   mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                   plot_dir: str | pathlib.Path | None = None, plot_prefix: str = ""
                   ) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
  """Decodes every valid record of ``batches`` (``input_pipeline.loader.eval_batches``) exactly once with
  ``system.generate`` and scores them with ``config.eval.evaluators``. Texts: ``system.decode_reports`` (default:
  the tokenizer's decode of the generated tokens and of ``targets[:, 1:]``). Returns ``(scores, reports)`` (a score
  is None where undefined) with one
  report dict per record: ``id``, ``reference``, ``generated`` and, when the system gives class probabilities,
  ``probabilities`` (C,) list. With ``plot_dir``, process 0 also writes the evaluators' pictures there
  (``evaluators.write_plots``, file names starting with ``plot_prefix``)."""
  from input_pipeline import loader  # pylint: disable=g-import-not-at-top

  config = system.config
  evaluators.check(tuple(config.eval.evaluators))
  mesh = mesh or sharding.create_mesh(config.mesh_shape)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  refs, gens, ids = [], [], []
  outputs: dict[str, list[np.ndarray]] = {k: [] for k in system.report_outputs}
  fields: dict[str, list[np.ndarray]] = {k: [] for k in system.batch_fields(train=False) if k != "images"}
  for batch in tqdm.tqdm(batches, desc="decoding", unit="batch", disable=not progress, dynamic_ncols=True):
    inputs = loader.to_global_batch(system.device_batch(batch, train=False), mesh)
    out = system.generate(variables, inputs)
    valid = _gather(np.asarray(batch["valid"], bool))
    host_out = {k: _gather(v)[valid] for k, v in out.items() if np.ndim(v) > 0}  # per-row outputs
    host_batch = {k: _gather(np.asarray(batch[k]))[valid] for k in ("targets", "masks") if k in batch}
    generated, references = system.decode_reports(tokenizer, host_out, host_batch)
    gens += generated
    refs += references
    ids += [i for i, v in zip(_gather_ids(batch["ids"]), valid) if v]
    for k, rows in outputs.items():
      rows.append(host_out[k].astype(np.float32))
    for k, rows in fields.items():
      rows.append(_gather(np.asarray(batch[k]))[valid])
  if not refs:
    raise ValueError("evaluate_split: the split has no records to evaluate.")
  predictions = evaluators.Predictions(ids, refs, gens, {k: np.concatenate(v) for k, v in outputs.items()},
                                       {k: np.concatenate(v) for k, v in fields.items()})
  scores = evaluators.evaluate(tuple(config.eval.evaluators), predictions, config)
  if plot_dir is not None and jax.process_index() == 0:
    evaluators.write_plots(tuple(config.eval.evaluators), predictions, config, plot_dir, plot_prefix)
  reports = [{"id": i, "reference": r, "generated": g} for i, r, g in zip(ids, refs, gens)]
  if "probs" in predictions.outputs:
    for report, p in zip(reports, predictions.outputs["probs"]):
      report["probabilities"] = p.tolist()
  return scores, reports


def predicted(probs: Mapping[str, float], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the classifier of ``config`` predicts from {class name: p}: ``{"prediction": the most probable class}``
  for a single-label classifier (``data.label_mode = "single"``), else ``{"predicted_findings": ...}``: the classes
  with p > τ_c for a system with per-class decision thresholds (``model.thresholds``, CT-AGRG §7.4, strict), else
  with p ≥ 0.5."""
  from input_pipeline import loader  # pylint: disable=g-import-not-at-top

  if loader.single_label(config):
    return {"prediction": max(probs, key=probs.get)}
  thresholds = config.model.get("thresholds", None)
  if thresholds:
    return {"predicted_findings": [n for (n, p), t in zip(probs.items(), thresholds) if p > t]}
  return {"predicted_findings": [n for n, p in probs.items() if p >= THRESHOLD]}


def write_reports(path: str | pathlib.Path, reports: Sequence[Mapping[str, Any]],
                  config: ml_collections.ConfigDict) -> None:
  """``evaluate_split`` reports as JSON lines: ``id``, ``reference``, ``generated`` and, with probabilities,
  ``probabilities`` {class name: p} and what the classifier predicts (``predicted``)."""
  names = class_names(config)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for r in reports:
      row = dict(r)
      if "probabilities" in r:
        probs = dict(zip(names, r["probabilities"]))
        row.update(probabilities=probs, **predicted(probs, config))
      f.write(json.dumps(row) + "\n")


# --- CLI ------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m rrg_jax.evaluate", description=__doc__.split("\n\n")[0],
                              epilog="Any --config.KEY=VALUE overrides a key of the checkpoint's config.")
  p.add_argument("--checkpoint", required=True, help="training workdir or inference checkpoint directory")
  p.add_argument("--split", default="test", choices=("train", "val", "test"))
  p.add_argument("--workdir", default=None, help="output directory (default: CHECKPOINT/eval_SPLIT)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def run(argv: Sequence[str]) -> dict[str, float | None]:
  """The CLI without the error handling: returns the scores."""
  from input_pipeline import loader  # pylint: disable=g-import-not-at-top

  overrides, rest = cli.split_config_overrides(argv)
  args = _parser().parse_args(rest)
  system, variables, tokenizer = cli.load_checkpoint(args.checkpoint, overrides)
  config = system.config
  out_dir = pathlib.Path(args.workdir or checkpointing.resolve_inference_dir(args.checkpoint) / f"eval_{args.split}")
  loader.check_tokenizer(config, tokenizer, f"the vocabulary of {args.checkpoint}")
  scores, reports = evaluate_split(system, variables, tokenizer, loader.eval_batches(config, tokenizer, args.split),
                                   progress=not args.no_progress, plot_dir=out_dir)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).write_text(json.dumps(
        {"split": args.split, "num_reports": len(reports), **evaluators.json_row(scores)}, indent=2, sort_keys=True))
    write_reports(out_dir / REPORTS_FILE, reports, config)
    print(f"{args.split}: {len(reports)} reports → {out_dir}")
    for k, v in scores.items():
      print(f"  {k:20s} {'undefined' if v is None else f'{v:.4f}'}")
  return scores


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)

  def initialized_run():
    sharding.initialize_distributed()
    compilation_cache.enable()
    return run(argv)

  return cli.run_main(initialized_run)


if __name__ == "__main__":
  sys.exit(main())
