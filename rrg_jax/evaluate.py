r"""Evaluation: decode a split with beam search (spec §9) and score it (spec §10 + clinical efficacy).

    python -m rrg_jax.evaluate --checkpoint DIR [--split test] [--workdir OUT] [--config.data.data_dir=...]

``DIR`` is a training workdir (its ``best/`` model) or an inference checkpoint (``rrg_jax.convert``,
``checkpointing.save_inference``). The checkpoint's config is used; ``--config.KEY=VALUE`` overrides existing keys
(e.g. the data location, ``decode.cached``, ``train.batch_size``, ``train.max_eval_examples``). ``OUT`` (default:
``DIR/eval_<split>``) receives ``metrics.json`` (the scores) and ``reports.jsonl`` (one row per record: ``id``,
``reference``, ``generated``, ``probabilities`` {class: p} of the classifier, ``predicted_findings`` (p ≥ 0.5)).

Scores: ``BLEU_1..4, METEOR, ROUGE_L, Cider, sacreBLEU`` (``metrics.text``); for 14-observation (CheXpert)
models also ``CE_*`` (``metrics.clinical``: generated vs reference text through the offline labeler) and
``CLS_*`` (the classifier's p ≥ 0.5 findings vs the dataset's labels, same precision / recall / F1 averages).
"""

from __future__ import annotations

import argparse
import ast
import difflib
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

from rrg_jax import checkpointing, decoding, sharding
from rrg_jax.metrics import clinical, text

THRESHOLD = 0.5
METRICS_FILE = "metrics.json"
REPORTS_FILE = "reports.jsonl"
_ID_BYTES = 256


# --- class names ----------------------------------------------------------------------------------------------

def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """Names of the ``config.model.num_classes`` classifier outputs: ``config.data.class_names`` when set, the 14
  CheXpert observations for 14 classes, else the ``classes`` of the data's labels.json, else ``class_<i>``."""
  n = int(config.model.num_classes)
  names = list(config.data.get("class_names", None) or ())
  if not names and n == len(clinical.OBSERVATIONS):
    names = list(clinical.OBSERVATIONS)
  if not names and config.data.get("labels", ""):
    from input_pipeline import records  # pylint: disable=g-import-not-at-top

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


def score_reports(references: Sequence[str], generated: Sequence[str], *, probs: np.ndarray | None = None,
                  labels: np.ndarray | None = None, chexpert: bool = False) -> dict[str, float]:
  """Text scores of ``generated`` vs ``references``; with ``chexpert`` also CE_* (labeler) and, given the
  classifier ``probs`` (N, 14) and dataset ``labels`` (N, 14), CLS_*."""
  keys = [str(i) for i in range(len(references))]
  scores = text.compute_scores(dict(zip(keys, references)), dict(zip(keys, generated)))
  if chexpert:
    scores.update(clinical.clinical_efficacy(generated, references))
    if probs is not None and labels is not None:
      cls = clinical.precision_recall_f1(probs >= THRESHOLD, labels >= THRESHOLD)
      scores.update({k.replace("CE_", "CLS_"): v for k, v in cls.items()})
  return scores


def evaluate_split(model, variables: Any, config: ml_collections.ConfigDict, tokenizer,
                   batches: Iterable[Mapping[str, Any]], *, mesh: jax.sharding.Mesh | None = None,
                   progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """Decodes every valid record of ``batches`` (``input_pipeline.loader.eval_batches``) exactly once and scores
  them. References are ``tokenizer.decode(targets[:, 1:])`` (spec §2.3). Returns ``(scores, reports)`` with one
  report dict per record: ``id``, ``reference``, ``generated``, ``probabilities`` (C,) list."""
  from input_pipeline import loader  # pylint: disable=g-import-not-at-top

  mesh = mesh or sharding.create_mesh(config.mesh_shape)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  refs, gens, ids, probs, labels = [], [], [], [], []
  for batch in tqdm.tqdm(batches, desc="decoding", unit="batch", disable=not progress, dynamic_ncols=True):
    images = loader.to_global_batch({"images": batch["images"]}, mesh)["images"]
    out = decoding.generate_reports(model, variables, images, config=config)
    valid = _gather(np.asarray(batch["valid"], bool))
    tokens, p = _gather(out["tokens"])[valid], _gather(out["probs"])[valid]
    targets = _gather(np.asarray(batch["targets"]))[valid]
    gens += tokenizer.decode_batch(tokens.tolist())
    refs += tokenizer.decode_batch(targets[:, 1:].tolist())
    ids += [i for i, v in zip(_gather_ids(batch["ids"]), valid) if v]
    probs.append(p.astype(np.float32))
    labels.append(_gather(np.asarray(batch["labels"], np.float32))[valid])
  if not refs:
    raise ValueError("evaluate_split: the split has no records to evaluate.")
  probs, labels = np.concatenate(probs), np.concatenate(labels)
  scores = score_reports(refs, gens, probs=probs, labels=labels,
                         chexpert=int(config.model.num_classes) == len(clinical.OBSERVATIONS))
  reports = [{"id": i, "reference": r, "generated": g, "probabilities": p.tolist()}
             for i, r, g, p in zip(ids, refs, gens, probs)]
  return scores, reports


def write_reports(path: str | pathlib.Path, reports: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
  """``evaluate_split`` reports as JSON lines: ``id``, ``reference``, ``generated``, ``probabilities``
  {class name: p} and ``predicted_findings`` (the classes with p ≥ 0.5)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for r in reports:
      probs = dict(zip(names, r["probabilities"]))
      f.write(json.dumps({**r, "probabilities": probs,
                          "predicted_findings": [n for n, p in probs.items() if p >= THRESHOLD]}) + "\n")


# --- CLI ------------------------------------------------------------------------------------------------------

class UserError(Exception):
  """A problem with the command line or its files; printed without a traceback."""


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


def load_checkpoint(path: str, overrides: Sequence[str] = ()):
  """(config with overrides, model, variables, tokenizer) of a checkpoint; ``UserError`` on a bad directory."""
  from rrg_jax import models  # pylint: disable=g-import-not-at-top

  try:
    config, variables, tokenizer = checkpointing.load_inference(path)
  except checkpointing.CheckpointError as e:
    raise UserError(str(e)) from None
  config = apply_overrides(config, overrides)
  return config, models.get_model(config.model), variables, tokenizer


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(``--config.*`` items, the other arguments)."""
  over = [a for a in argv if a.startswith("--config.")]
  return over, [a for a in argv if not a.startswith("--config.")]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m rrg_jax.evaluate", description=__doc__.split("\n\n")[0],
                              epilog="Any --config.KEY=VALUE overrides a key of the checkpoint's config.")
  p.add_argument("--checkpoint", required=True, help="training workdir or inference checkpoint directory")
  p.add_argument("--split", default="test", choices=("train", "val", "test"))
  p.add_argument("--workdir", default=None, help="output directory (default: CHECKPOINT/eval_SPLIT)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def run(argv: Sequence[str]) -> dict[str, float]:
  """The CLI without the error handling: returns the scores."""
  from input_pipeline import loader, records  # pylint: disable=g-import-not-at-top

  overrides, rest = split_config_overrides(argv)
  args = _parser().parse_args(rest)
  config, model, variables, tokenizer = load_checkpoint(args.checkpoint, overrides)
  out_dir = pathlib.Path(args.workdir or checkpointing.resolve_inference_dir(args.checkpoint) / f"eval_{args.split}")
  try:
    loader.check_tokenizer(config, tokenizer, f"the vocabulary of {args.checkpoint}")
    scores, reports = evaluate_split(model, variables, config, tokenizer,
                                     loader.eval_batches(config, tokenizer, args.split),
                                     progress=not args.no_progress)
  except (records.DataError, FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).write_text(json.dumps({"split": args.split, "num_reports": len(reports), **scores},
                                                   indent=2, sort_keys=True))
    write_reports(out_dir / REPORTS_FILE, reports, class_names(config))
    print(f"{args.split}: {len(reports)} reports → {out_dir}")
    for k, v in scores.items():
      print(f"  {k:20s} {v:.4f}")
  return scores


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    run(argv)
  except UserError as e:
    print(f"ERROR: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sharding.initialize_distributed()
  sys.exit(main())
