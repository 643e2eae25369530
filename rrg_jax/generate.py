r"""Generate a report for one study, with its predicted findings and heatmaps.

    python -m rrg_jax.generate --checkpoint DIR --image frontal.png [--image lateral.png] [--out OUTDIR] \
        [--json] [--words N] [--config.decode.method=greedy]
    python -m rrg_jax.generate --checkpoint DIR --volume chest.nii.gz|chest.npz [--out OUTDIR] [--json]

A CT system (``config.data.format = "ct_rate"``, CT-AGRG) takes ``--volume``: a contract ``.npz`` (HU, SLP, 1.5 ×
0.75 × 0.75 mm; ``input_pipeline.volumes``) or a NIfTI file (reoriented and resampled from its header, slope and
intercept from its header) → the preprocessed volume; it prints the probability of every abnormality (* = above
its decision threshold) and the report, and writes ``OUTDIR/montage.png`` (axial and coronal slices with the
detected abnormalities listed).

``DIR``: a training workdir (its best model) or an inference checkpoint of any registered system. Give exactly
``config.data.num_views`` images (2 for IU X-Ray models: the two views in dataset order). Images are preprocessed
with the evaluation transform (squash to ``image_size``, ImageNet normalisation) and decoded as in evaluation
(``config.decode``). Prints the report and, for systems with a classifier, its findings (probability, predicted
when ≥ 0.5; with ``config.data.label_mode = "single"`` the most probable class is the prediction), and writes
``OUTDIR/report_attention.png`` for systems that classify the generated report (RadGen: the fusion's attention over
its words), and ``OUTDIR/words.png`` (the decoder's cross-attention over the views for ``N`` generated
words: those whose attention best matches the VDM where the system has one, else the most focused ones) and, for
CAMANet-style systems, ``OUTDIR/vdm.png`` (the visual discriminative map over each view). ``--json`` prints one
JSON object instead.

Systems whose inputs include per-example features (``config.data.features``, e.g. Align2Gen's lesion crops) get
them as in evaluation. Box-reading features take ``--boxes FILE``: a JSON object with the annotation's box fields
(``boxes``, ``scores``, ``height``, ``width``; ``config.data.box_format``), drawn on the first view in
``OUTDIR/boxes.png``; without it the study has no boxes (every slot empty).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax

from rrg_jax import cli, compilation_cache, evaluate, heatmaps
from rrg_jax.cli import UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m rrg_jax.generate", description=__doc__.split("\n\n")[0],
                              epilog="Any --config.KEY=VALUE overrides a key of the checkpoint's config.")
  p.add_argument("--checkpoint", required=True, help="training workdir or inference checkpoint directory")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--image", action="append", help="an image file; repeat once per view")
  source.add_argument("--volume", help="a CT volume: contract .npz or NIfTI (.nii / .nii.gz), for CT systems")
  p.add_argument("--out", default="generated", help="directory for the heatmap PNGs (default: ./generated)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--words", type=int, default=4, help="number of words with attention heatmaps (0: none)")
  p.add_argument("--boxes", default=None, help="JSON file with the box fields (boxes, scores, height, width) of "
                 "the study, for systems with a lesion branch (default: no boxes)")
  return p


def feature_inputs(config, tokenizer, image, image_path: str, boxes_path: str | None
                   ) -> tuple[dict[str, Any], Any]:
  """The evaluation features of ``config.data.features`` for one study (first view ``image``) → (their arrays
  with a batch axis of 1, the ``input_pipeline.boxes.BoxSet`` read from ``boxes_path`` or None)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from input_pipeline import boxes, features, records  # pylint: disable=g-import-not-at-top

  feats = features.build(config, tokenizer, train=False)
  box_format = features.box_format(config)
  raw: dict[str, Any] = {"id": image_path}
  box_set = None
  if box_format is not None:
    if boxes_path:
      path = pathlib.Path(boxes_path)
      try:
        record = json.loads(path.read_text())
      except (OSError, ValueError) as e:
        raise UserError(f"--boxes {path}: cannot read a JSON object ({e}).") from None
      if not isinstance(record, dict):
        raise UserError(f"--boxes {path}: expected a JSON object with boxes, scores, height, width.")
      try:
        box_set = boxes.parse_box_fields(record, box_format=box_format, where=f"--boxes {path}")
      except records.DataError as e:
        raise UserError(str(e)) from None
      if box_set is None:
        raise UserError(f"--boxes {path}: has none of the box fields {list(boxes.BOX_FIELDS)}.")
    raw["boxes"] = box_set or boxes.BoxSet(np.zeros((0, 4)), np.zeros((0,), bool), np.zeros((0,)),
                                           image.height, image.width)
  elif boxes_path:
    raise UserError(f"--boxes: the system {config.model.name!r} of this checkpoint reads no boxes.")
  out: dict[str, Any] = {}
  for feature in feats:
    out.update(feature(raw, image, None, out))
  return {k: np.asarray(v)[None] for k, v in out.items()}, box_set


def load_views(paths: Sequence[str], num_views: int):
  """Image files → list of PIL images (``"L"``/``"RGB"``); ``UserError`` if missing, unreadable or the count
  differs from ``num_views``."""
  from input_pipeline import records  # pylint: disable=g-import-not-at-top

  if len(paths) != num_views:
    raise UserError(f"The model takes {num_views} view(s) per study (config.data.num_views) but {len(paths)} "
                    f"image(s) were given.")
  views = []
  for path in paths:
    p = pathlib.Path(path)
    if not p.is_file():
      raise UserError(f"Image {p} not found.")
    try:
      views.append(records.decode_image(p.read_bytes(), str(p)))
    except records.DataError as e:
      raise UserError(str(e)) from None
  return views


def generate(args: argparse.Namespace, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Parsed CLI arguments (+ ``--config.*`` overrides) → the result object (what ``--json`` prints)."""
  from input_pipeline import transforms  # pylint: disable=g-import-not-at-top

  if args.words < 0:
    raise UserError(f"--words must be >= 0, got {args.words}.")
  system, variables, tokenizer = cli.load_checkpoint(args.checkpoint, overrides)
  d = system.config.data
  if (d.get("format", "") == "ct_rate") != bool(args.volume):
    raise UserError(f"The {system.name} model of {args.checkpoint} takes "
                    + ("--volume (a CT volume)." if args.volume is None else "--image (X-ray views), not --volume."))
  if args.volume:
    return generate_from_volume(system, variables, tokenizer, args.volume, pathlib.Path(args.out))
  views = load_views(args.image, int(d.num_views))
  size = int(d.image_size)
  images = transforms.transform_views(views, None, train=False, augment=d.augment, resize=int(d.resize),
                                      image_size=size)
  extra, box_set = feature_inputs(system.config, tokenizer, views[0], args.image[0], args.boxes)
  out = jax.device_get(system.generate(variables, {"images": images[None], **extra}, with_attention=True))
  report = system.decode_reports(tokenizer, out, {})[0][0]
  words = report.split()
  shown = [v.convert("RGB").resize((size, size)) for v in views]  # what the model saw (squashed)
  out_dir = pathlib.Path(args.out)
  files = {}
  if box_set is not None:
    files["boxes"] = str(heatmaps.save_boxes(views[0], box_set.xyxy[box_set.valid], box_set.width,
                                             box_set.height, out_dir / "boxes.png"))
  vdm = out["vdm"][0] if "vdm" in out else None
  if vdm is not None:
    files["vdm"] = str(heatmaps.save_vdm(shown, vdm, out_dir / "vdm.png"))
  positions = []
  if "word_attention" in out:
    positions = heatmaps.top_words(words, out["word_attention"][0], vdm, args.words)
  if positions:
    files["words"] = str(heatmaps.save_word_attention(shown, words, out["word_attention"][0], positions,
                                                      out_dir / "words.png"))
  if "report_attention" in out and words:
    files["report_attention"] = str(heatmaps.save_report_attention(words, out["report_attention"][0],
                                                                   out_dir / "report_attention.png"))
  result = {"report": report, "log_prob": float(out["scores"][0])}
  if "probs" in out:
    probs = {n: float(p) for n, p in zip(evaluate.class_names(system.config), out["probs"][0])}
    result["findings"] = dict(sorted(probs.items(), key=lambda kv: -kv[1]))
    result.update(evaluate.predicted(probs, system.config))
  return {**result, "heatmap_words": [words[i] for i in positions], "heatmaps": files}


def load_volume(path: str):
  """A CT file → its contract array (float32 HU, SLP, 1.5 × 0.75 × 0.75 mm): ``.npz`` read and checked, NIfTI
  converted from its header (``input_pipeline.volumes``); ``UserError`` naming the file otherwise."""
  from input_pipeline import records, volumes  # pylint: disable=g-import-not-at-top

  p = pathlib.Path(path)
  if not p.is_file():
    raise UserError(f"Volume {p} not found.")
  try:
    if p.name.endswith((".nii", ".nii.gz")):
      return volumes.nifti_to_contract(p)
    if p.suffix == ".npz":
      return volumes.load_contract_volume(p)
  except records.DataError as e:
    raise UserError(str(e)) from None
  raise UserError(f"Volume {p}: expected a contract .npz or a NIfTI .nii / .nii.gz file.")


def generate_from_volume(system, variables, tokenizer, path: str, out_dir: pathlib.Path) -> dict[str, Any]:
  """One CT volume → ``{"report", "findings" {abnormality: p}, "predicted_findings", "heatmaps"}`` (montage.png)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from input_pipeline import volumes  # pylint: disable=g-import-not-at-top

  config = system.config
  hu = load_volume(path)
  x = volumes.preprocess(hu, tuple(int(n) for n in config.data.volume_shape))
  out = jax.device_get(system.generate(variables, {"volumes": x[None]}))
  report = system.decode_reports(tokenizer, out, {})[0][0]
  probs = {n: float(p) for n, p in zip(evaluate.class_names(config), np.asarray(out["probs"][0]))}
  result = {"report": report, "findings": probs, **evaluate.predicted(probs, config)}
  detected = [(n, probs[n]) for n in result["predicted_findings"]]
  montage = heatmaps.save_ct_montage(hu, out_dir / "montage.png", findings=detected, title=pathlib.Path(path).name)
  return {**result, "heatmap_words": [], "heatmaps": {"montage": str(montage)}}


def _print(result: dict[str, Any]) -> None:
  print("Report:")
  print(f"  {result['report'] or '(empty)'}")
  if "prediction" in result:
    print(f"Prediction: {result['prediction']}")
    print("Class probabilities:")
    for name, p in result["findings"].items():
      print(f"  {'*' if name == result['prediction'] else ' '} {name:32s} {p:.3f}")
  elif "findings" in result:
    print("Findings (classifier probability; * = predicted):")
    for name, p in result["findings"].items():
      print(f"  {'*' if name in result['predicted_findings'] else ' '} {name:32s} {p:.3f}")
  print("Heatmaps:")
  for kind, path in result["heatmaps"].items():
    print(f"  {kind}: {path}")
  if not result["heatmaps"]:
    print("  (none: the report has no word to show other than '.' and '<unk>')")
  if result["heatmap_words"]:
    print(f"  words: {', '.join(result['heatmap_words'])}")


def main(argv: Sequence[str] | None = None) -> int:
  overrides, rest = cli.split_config_overrides(list(sys.argv[1:] if argv is None else argv))
  args = _parser().parse_args(rest)
  compilation_cache.enable()

  def run() -> None:
    result = generate(args, overrides)
    if args.json:
      print(json.dumps(result))
    else:
      _print(result)

  return cli.run_main(run)


if __name__ == "__main__":
  sys.exit(main())
