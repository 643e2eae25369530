r"""Lesion boxes for data that has none, from a trained rrg_jax classifier: its visual discriminative map (the
CAMs of the findings it predicts, max over classes, min-max normalised; ``alignment.cam``) → threshold →
connected components → bounding rectangles. Align2Gen's lesion branch reads them (``input_pipeline.boxes``).

This is rrg_jax's own stand-in for Align2Gen's detector (align2gen_spec §2.2: a semi-supervised Faster R-CNN on
VinDr-CXR whose export scripts were never published), not the paper's method.

    python -m rrg_jax.boxes --checkpoint DIR --out annotation_boxes.json [--threshold 0.5] [--max-boxes 8] \
        [--config.data.data_dir=DATA]

``DIR``: a training workdir or inference checkpoint of a system whose ``encode`` gives a ``vdm`` (CAMANet). Every
record of every split of the checkpoint's data (or ``DATA``) gets ``boxes`` (COCO ``[x, y, w, h]`` in pixels of
its first image, best first, ``[-1, -1, -1, -1]`` padding), ``scores`` (the map's maximum inside each box),
``height`` and ``width``; the output is a copy of the annotation with these fields, plus
``OUT.provenance.json`` (checkpoint, threshold, command, date). Bad input: one ``error: …`` line, exit 2.

``boxes_from_map`` is the pure function: grid cell (r, c) of an h × w map covers pixels
``[c·W/w, (c+1)·W/w) × [r·H/h, (r+1)·H/h)`` of the W × H image; components are 4-connected cells ≥ threshold.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
import PIL.Image
import scipy.ndimage

from rrg_jax import cli, compilation_cache
from rrg_jax.cli import UserError

EMPTY = [-1.0, -1.0, -1.0, -1.0]


def boxes_from_map(heat: np.ndarray, *, threshold: float, width: int, height: int, max_boxes: int
                   ) -> tuple[list[list[float]], list[float]]:
  """heat (h, w) in [0, 1] → (``max_boxes`` COCO boxes ``[x, y, w, h]`` in pixels of the W × H image, best score
  first then empty slots; scores = the map's maximum in each component, 0 for empty slots)."""
  heat = np.asarray(heat, np.float64)
  labels, _ = scipy.ndimage.label(heat >= threshold)
  gh, gw = heat.shape
  found = []
  for index, region in enumerate(scipy.ndimage.find_objects(labels), start=1):
    rows, cols = region
    score = float(heat[region][labels[region] == index].max())
    x0, x1 = cols.start * width / gw, cols.stop * width / gw
    y0, y1 = rows.start * height / gh, rows.stop * height / gh
    found.append((score, [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]))
  found.sort(key=lambda sb: -sb[0])  # stable: equal scores keep the raster order of their first cell
  found = found[:max_boxes]
  return ([b for _, b in found] + [list(EMPTY)] * (max_boxes - len(found)),
          [round(s, 6) for s, _ in found] + [0.0] * (max_boxes - len(found)))


def _image_size(path: str) -> tuple[int, int]:
  """(width, height) from the file's header (the image was checked when its split was loaded)."""
  with PIL.Image.open(path) as im:
    return im.size


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m rrg_jax.boxes", description=__doc__.split("\n\n")[0],
                              epilog="Any --config.KEY=VALUE overrides a key of the checkpoint's config.")
  p.add_argument("--checkpoint", required=True, help="training workdir or inference checkpoint directory")
  p.add_argument("--out", required=True, help="the annotation copy to write")
  p.add_argument("--threshold", type=float, default=0.5, help="map level a cell must reach (default 0.5)")
  p.add_argument("--max-boxes", type=int, default=8, help="box slots per record (default 8)")
  return p


def run(argv: Sequence[str]) -> pathlib.Path:
  from input_pipeline import loader, records  # pylint: disable=g-import-not-at-top

  overrides, rest = cli.split_config_overrides(argv)
  args = _parser().parse_args(rest)
  if not 0.0 < args.threshold <= 1.0 or args.max_boxes < 1:
    raise UserError(f"--threshold must be in (0, 1] and --max-boxes >= 1 (got {args.threshold}, "
                    f"{args.max_boxes}).")
  system, variables, tokenizer = cli.load_checkpoint(args.checkpoint, overrides)
  config = system.config
  encode = jax.jit(lambda v, images: system.module.apply(v, images, method="encode"))
  root = records.resolve_data_dir(config.data.data_dir)
  annotation = records.read_annotation(root / config.data.annotation)
  views = int(config.data.num_views)
  found: dict[str, tuple[list, list, int, int]] = {}
  for split in annotation:
    sizes = {r.id: _image_size(r.image_paths[0]) for r in loader.load_records(config, split)}
    for batch in loader.eval_batches(config, tokenizer, split):
      out = jax.device_get(encode(variables, system.device_batch(batch, train=False)["images"]))
      if "vdm" not in out:
        raise UserError(f"The system {config.model.name!r} of {args.checkpoint} has no visual discriminative map "
                        "(its encode gives no 'vdm'); use a classifier system such as camanet.")
      per_view = out["vdm"].shape[1] // views
      side = math.isqrt(per_view)
      for rid, ok, vdm in zip(batch["ids"], batch["valid"], out["vdm"]):
        if ok:
          w, h = sizes[rid]
          b, s = boxes_from_map(vdm[:per_view].reshape(side, side), threshold=args.threshold, width=w, height=h,
                                max_boxes=args.max_boxes)
          found[rid] = (b, s, h, w)
  for split in annotation.values():
    for r in split:
      if str(r["id"]) in found:
        r["boxes"], r["scores"], r["height"], r["width"] = found[str(r["id"])]
  out_path = pathlib.Path(args.out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(annotation))
  provenance = {"checkpoint": str(pathlib.Path(args.checkpoint).absolute()), "threshold": args.threshold,
                "max_boxes": args.max_boxes, "records": len(found), "source": "rrg_jax.boxes (CAM/VDM boxes)",
                "command": "python -m rrg_jax.boxes " + " ".join(argv),
                "date": datetime.date.today().isoformat()}
  out_path.with_name(out_path.name + ".provenance.json").write_text(json.dumps(provenance, indent=2))
  print(f"boxes for {len(found)} records → {out_path}")
  return out_path


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  compilation_cache.enable()
  return cli.run_main(lambda: run(argv))


if __name__ == "__main__":
  sys.exit(main())
