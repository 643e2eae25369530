r"""Input-pipeline throughput: train images/s on the embedded sample and on synthetic IU-sized 16-bit PNGs.

    python benchmarks/input_pipeline.py [--batches 20] [--workers 0,1,2] [--records 128]

For each dataset and Grain worker count it builds ``loader.train_dataset`` (full-size 224 px transforms, batch 32),
skips one warm-up batch, then times ``--batches`` batches and prints images/s (one image = one view; IU-sized
studies have 2 views of 512x624 16-bit grayscale PNGs, generated into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
import PIL.Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import camanet  # noqa: E402
from input_pipeline import loader  # noqa: E402


def make_iu_like(root: pathlib.Path, n: int) -> pathlib.Path:
  """``n`` train studies (+4 val/test) with two 512x624 16-bit PNG views each, R2Gen layout, 14 labels."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:624, 0:512]
  base = (20000 + 15000 * np.sin(xx / 40.0) * np.cos(yy / 55.0)).astype(np.int64)
  ann, labels = {"train": [], "val": [], "test": []}, {}
  for i in range(n + 8):
    split = "train" if i < n else ("val" if i < n + 4 else "test")
    rid = f"CXR{i}_IM-{i:04d}"
    for v in range(2):
      noise = rng.integers(0, 20000, (624, 512))
      path = root / "images" / rid / f"{v}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      PIL.Image.fromarray(np.clip(base + noise, 0, 65535).astype(np.uint16)).save(path)
    ann[split].append({"id": rid, "report": "The heart is normal. No effusion.",
                       "image_path": [f"{rid}/0.png", f"{rid}/1.png"], "split": split})
    labels[rid] = [int(x) for x in rng.integers(0, 2, 14)]
  (root / "annotation.json").write_text(json.dumps(ann))
  (root / "labels.json").write_text(json.dumps(labels))
  return root


def measure(config, batches: int) -> float:
  tokenizer = loader.build_tokenizer(config)
  it = iter(loader.train_dataset(config, tokenizer, seed=0))
  try:
    next(it)  # warm-up: worker start, first file reads
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  return batches * config.train.batch_size * config.data.num_views / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--records", type=int, default=128, help="synthetic IU-sized train studies")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    iu_dir = make_iu_like(pathlib.Path(tmp), args.records)
    for name, preset, data_dir in (("sample (1 view, JPEG ~256px)", "sample", ""),
                                   ("IU-sized (2 views, 512x624 16-bit PNG)", "iu_xray", str(iu_dir))):
      for w in workers:
        c = camanet.get_config(preset)
        c.data.data_dir = data_dir
        c.data.num_workers = w
        c.train.batch_size = 32
        rate = measure(c, args.batches)
        print(f"{name:40s} workers={w}: {rate:7.1f} images/s", flush=True)


if __name__ == "__main__":
  main()
