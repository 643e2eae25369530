"""TFDS builders: prepare + read back through ``tfds.data_source`` with TensorFlow unimportable."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline import records, tfds_builders
from input_pipeline.tokenizer import count_words

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, sys
    try:
      import tensorflow
      raise SystemExit("tensorflow was importable")
    except ImportError:
      pass
    import tensorflow_datasets as tfds
    from input_pipeline import tfds_builders
    data_dir, manual_dir = sys.argv[1], sys.argv[2] or None
    builder = tfds_builders.prepared_builder(sys.argv[3], data_dir=data_dir, manual_dir=manual_dir)
    out = {}
    for split in builder.info.splits:
      ds = tfds.data_source(sys.argv[3], split=split, data_dir=data_dir, download=False)
      ex = ds[0]
      out[split] = {"n": len(ds), "id": ex["id"].decode(), "report": ex["report"].decode(),
                    "image0": ex["images"][0].hex(), "views": len(ex["images"]),
                    "names": [n.decode() for n in ex["image_names"]], "labels": ex["labels"].tolist()}
    out["word_counts"] = builder.info.metadata["word_counts"]
    out["tf_loaded"] = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
    print("RESULT" + json.dumps(out))
""")


def _prepare_without_tf(tmp_path: pathlib.Path, name: str, manual_dir: str = "") -> dict:
  fake = tmp_path / "no_tf"
  fake.mkdir()
  (fake / "tensorflow.py").write_text("raise ImportError('TensorFlow is deliberately unavailable')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(REPO)]))
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "tfds"), manual_dir, name],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_cxr_sample_builds_and_reads_without_tensorflow(tmp_path):
  out = _prepare_without_tf(tmp_path, "cxr_sample")
  assert out["tf_loaded"] == []
  assert {s: out[s]["n"] for s in ("train", "val", "test")} == {"train": 147, "val": 21, "test": 51}
  for split in ("train", "val", "test"):
    first = records.load_split("", split, num_classes=15)[0]
    got = out[split]
    assert got["id"] == first.id and got["report"] == first.report and got["views"] == 1
    assert bytes.fromhex(got["image0"]) == pathlib.Path(first.image_paths[0]).read_bytes()  # JPEG bytes as found
    assert got["names"] == list(first.image_paths)
    np.testing.assert_array_equal(np.asarray(got["labels"], np.float32), first.labels)
  train = [r.report for r in records.load_split("", "train")]
  assert out["word_counts"]["mimic"] == dict(count_words(train, "mimic"))
  assert out["word_counts"]["iu"] == dict(count_words(train, "iu"))


def test_iu_xray_two_views_iu_label_keys(tmp_path):
  from test_records import make_r2gen_folder

  src = make_r2gen_folder(tmp_path / "iu", {"train": 3, "val": 1, "test": 2}, views=2, iu_ids=True,
                          mode="I;16", num_classes=14)
  out = _prepare_without_tf(tmp_path, "iu_xray", str(src))
  assert (out["train"]["n"], out["val"]["n"], out["test"]["n"]) == (3, 1, 2)
  assert out["train"]["views"] == 2 and out["train"]["id"] == "CXR0_IM-0000-0001"
  assert out["train"]["labels"] == [float(c % 2) for c in range(14)]
  assert bytes.fromhex(out["train"]["image0"]) == (src / "images" / "CXR0_IM-0000-0001" / "0.png").read_bytes()


def test_mimic_cxr_in_process_one_view(tmp_path):
  from test_records import make_r2gen_folder

  src = make_r2gen_folder(tmp_path / "m", {"train": 2, "val": 1, "test": 1}, views=2, suffix="jpg")
  builder = tfds_builders.prepared_builder("mimic_cxr", data_dir=tmp_path / "tfds", manual_dir=src)
  ds = tfds.data_source("mimic_cxr", split="test", data_dir=str(tmp_path / "tfds"), download=False)
  ex = ds[0]
  assert len(ex["images"]) == 1 and ex["id"] == b"r3"  # image_path[0] only
  assert builder.info.splits["train"].num_examples == 2


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'chexpert'"):
    tfds_builders.prepared_builder("chexpert", data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tfds_builders.prepared_builder("iu_xray", data_dir=tmp_path, prepare=False)
  with pytest.raises(FileNotFoundError, match="config.data.data_dir"):
    tfds_builders.prepared_builder("iu_xray", data_dir=tmp_path)
  from test_records import make_r2gen_folder

  src = make_r2gen_folder(tmp_path / "bad", {"train": 2, "val": 1, "test": 1})
  (src / "images" / "r1" / "0.png").unlink()
  with pytest.raises(records.DataError, match="record 'r1'"):
    tfds_builders.prepared_builder("mimic_cxr", data_dir=tmp_path / "t2", manual_dir=src)
  b = tfds_builders.prepared_builder("mimic_cxr", data_dir=tmp_path / "t3", manual_dir=src, on_bad_record="skip")
  assert b.info.splits["train"].num_examples == 1
