"""records: R2Gen folder reading, both labels.json forms, label keys, image decoding, validation errors."""

from __future__ import annotations

import io
import json
import logging
import pathlib

import numpy as np
import PIL.Image
import pytest

from input_pipeline import records
from input_pipeline.records import DataError

WORDS = ("heart", "normal", "lungs", "clear", "no", "effusion", "mild", "opacity", "left", "base")


def make_image(path: pathlib.Path, mode: str = "L", size: tuple[int, int] = (40, 48), seed: int = 0) -> np.ndarray:
  """Writes a random image (``mode`` L, RGB or I;16; format from the suffix); returns its pixel array."""
  rng = np.random.default_rng(seed)
  w, h = size
  if mode == "I;16":
    a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
  elif mode == "RGB":
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  else:
    a = rng.integers(0, 256, (h, w), dtype=np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(a).save(path)
  return a


def make_r2gen_folder(root: pathlib.Path, sizes: dict[str, int] | None = None, *, views: int = 1,
                      suffix: str = "png", mode: str = "L", num_classes: int = 3, labels_form: str = "plain",
                      iu_ids: bool = False, image_size: tuple[int, int] = (40, 48)) -> pathlib.Path:
  """A small synthetic R2Gen-layout dataset; record ``i`` has labels ``[(i + c) % 2 for c in range(C)]``."""
  sizes = sizes or {"train": 6, "val": 3, "test": 3}
  ann, labels, n = {}, {}, 0
  for split, count in sizes.items():
    ann[split] = []
    for _ in range(count):
      rid = f"CXR{n}_IM-{n:04d}-0001" if iu_ids else f"r{n}"
      paths = [f"{rid}/{v}.{suffix}" for v in range(views)]
      for v, p in enumerate(paths):
        make_image(root / "images" / p, mode, image_size, seed=10 * n + v)
      words = [WORDS[(n * 3 + k) % len(WORDS)] for k in range(3 + n % 4)]
      ann[split].append({"id": rid, "report": " ".join(words).capitalize() + ". Heart normal.",
                         "image_path": paths, "split": split})
      key = records.label_key(rid, "iu" if iu_ids else "id")
      labels[key] = [(n + c) % 2 for c in range(num_classes)]
      n += 1
  (root / "annotation.json").write_text(json.dumps(ann))
  if labels_form == "classes":
    labels = {"classes": [f"c{c}" for c in range(num_classes)], "labels": labels}
  if labels_form:
    (root / "labels.json").write_text(json.dumps(labels))
  return root


def _edit_annotation(root: pathlib.Path, fn) -> None:
  path = root / "annotation.json"
  ann = json.loads(path.read_text())
  fn(ann)
  path.write_text(json.dumps(ann))


def test_embedded_sample_from_any_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  train = records.load_split("", "train", num_classes=15)
  assert len(train) == 147
  assert records.resolve_data_dir("") == records.SAMPLE_DIR
  first = train[0]
  assert first.id == "p5_1a22778f" and first.report.startswith("Severe ARDS.")
  assert pathlib.Path(first.image_paths[0]).is_file() and first.labels.shape == (15,)
  assert first.labels[0] == 1.0 and first.labels.sum() == 1.0  # ARDS
  assert len(records.load_split("", "val")) == 21 and len(records.load_split("", "test")) == 51


@pytest.mark.parametrize("form", ["plain", "classes"])
def test_both_label_forms(tmp_path, form):
  root = make_r2gen_folder(tmp_path, num_classes=4, labels_form=form)
  recs = records.load_split(root, "val", num_classes=4)
  assert [r.id for r in recs] == ["r6", "r7", "r8"]
  np.testing.assert_array_equal(recs[1].labels, np.array([1, 0, 1, 0], np.float32))
  assert recs[1].labels.dtype == np.float32


def test_iu_label_key_and_two_views(tmp_path):
  root = make_r2gen_folder(tmp_path, views=2, iu_ids=True)
  assert records.label_key("CXR2372_IM-0933-0001", "iu") == "CXR2372_IM-0933"
  assert records.label_key("CXR2372_IM-0933", "iu") == "CXR2372_IM-0933"
  recs = records.load_split(root, "train", label_key_rule="iu", num_views=2)
  assert all(len(r.image_paths) == 2 for r in recs)
  with pytest.raises(DataError, match=r"no entry 'CXR0_IM-0000-0001'"):
    records.load_split(root, "train", label_key_rule="id", num_views=2)


def test_one_view_uses_first_image(tmp_path):
  root = make_r2gen_folder(tmp_path, views=2)
  recs = records.load_split(root, "train", num_views=1)
  assert [pathlib.Path(r.image_paths[0]).name for r in recs] == ["0.png"] * 6


def test_no_labels_file(tmp_path):
  root = make_r2gen_folder(tmp_path, labels_form="")
  recs = records.load_split(root, "train", labels="", num_classes=3)
  np.testing.assert_array_equal(recs[0].labels, np.zeros(3, np.float32))


def test_decode_8bit_16bit_rgb(tmp_path):
  gray = make_image(tmp_path / "g.png", "L")
  im = records.decode_image((tmp_path / "g.png").read_bytes(), "g.png")
  assert im.mode == "L"
  np.testing.assert_array_equal(np.asarray(im), gray)
  # 16-bit: full range mapped linearly, round(v * 255 / 65535).
  a16 = np.array([[0, 128, 129, 257 * 100, 65535, 32767]], np.uint16)
  buf = io.BytesIO()
  PIL.Image.fromarray(a16).save(buf, format="PNG")
  im16 = records.decode_image(buf.getvalue(), "x16.png")
  assert im16.mode == "L"
  np.testing.assert_array_equal(np.asarray(im16), [[0, 0, 1, 100, 255, 127]])
  rgb = make_image(tmp_path / "c.png", "RGB")
  im = records.decode_image((tmp_path / "c.png").read_bytes(), "c.png")
  assert im.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(im), rgb)
  # RGBA / palette: as PIL convert('RGB').
  rgba = PIL.Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA")
  buf = io.BytesIO()
  rgba.save(buf, format="PNG")
  np.testing.assert_array_equal(np.asarray(records.decode_image(buf.getvalue(), "a.png")),
                                np.asarray(rgba.convert("RGB")))
  make_image(tmp_path / "j.jpg", "L")
  assert records.decode_image((tmp_path / "j.jpg").read_bytes(), "j.jpg").mode == "L"


def test_decode_errors_name_the_file(tmp_path):
  make_image(tmp_path / "g.png", "L", (64, 64))
  data = (tmp_path / "g.png").read_bytes()
  with pytest.raises(DataError, match=r"trunc\.png \(record 'r1'\)"):
    records.decode_image(data[: len(data) // 2], "trunc.png (record 'r1')")
  with pytest.raises(DataError, match="junk.png"):
    records.decode_image(b"not an image", "junk.png")


def test_missing_and_corrupt_images_error_or_skip(tmp_path, caplog):
  root = make_r2gen_folder(tmp_path)
  (root / "images" / "r1" / "0.png").unlink()
  (root / "images" / "r3" / "0.png").write_bytes(b"\x89PNG garbage")
  with pytest.raises(DataError, match=r"record 'r1'.*image file not found.*r1/0\.png"):
    records.load_split(root, "train")
  with caplog.at_level(logging.WARNING):
    recs = records.load_split(root, "train", on_bad_record="skip")
  assert [r.id for r in recs] == ["r0", "r2", "r4", "r5"]
  text = caplog.text
  assert "record 'r1'" in text and "record 'r3'" in text and "corrupt" in text
  assert "Skipped 2 bad record(s)" in text


def test_truncated_png_is_caught_at_load(tmp_path):
  root = make_r2gen_folder(tmp_path, image_size=(64, 64))
  p = root / "images" / "r2" / "0.png"
  p.write_bytes(p.read_bytes()[:-30])
  with pytest.raises(DataError, match=r"record 'r2'.*corrupt"):
    records.load_split(root, "train")


@pytest.mark.parametrize("report", ["", "  \n "])
def test_empty_report(tmp_path, report):
  root = make_r2gen_folder(tmp_path)
  _edit_annotation(root, lambda a: a["train"][2].update(report=report))
  with pytest.raises(DataError, match=r"record 'r2'.*report is empty"):
    records.load_split(root, "train")
  assert len(records.load_split(root, "train", on_bad_record="skip")) == 5


def test_too_few_views(tmp_path):
  root = make_r2gen_folder(tmp_path)
  with pytest.raises(DataError, match=r"record 'r0'.*1 image\(s\) listed, 2 view"):
    records.load_split(root, "train", num_views=2)


def test_structural_errors(tmp_path):
  root = make_r2gen_folder(tmp_path)
  with pytest.raises(DataError, match=r"no split 'dev'.*\['test', 'train', 'val'\]"):
    records.load_split(root, "dev")
  _edit_annotation(root, lambda a: a["val"][1].pop("report"))
  with pytest.raises(DataError, match=r"record 1 of split 'val' \('r7'\) lacks key\(s\) \['report'\]"):
    records.load_split(root, "train")
  _edit_annotation(root, lambda a: a["val"][1].update(report="x", id="r0"))
  with pytest.raises(DataError, match=r"duplicate id 'r0'"):
    records.load_split(root, "train")
  (root / "annotation.json").write_text("{oops")
  with pytest.raises(DataError, match="annotation.json is not readable JSON"):
    records.load_split(root, "train")
  with pytest.raises(DataError, match="not found"):
    records.load_split(tmp_path / "nowhere", "train")
  with pytest.raises(DataError, match="on_bad_record"):
    records.load_split(root, "train", on_bad_record="ignore")


def test_label_errors(tmp_path):
  root = make_r2gen_folder(tmp_path, num_classes=3, labels_form="classes")
  with pytest.raises(DataError, match="has 3 classes but the config expects 14"):
    records.load_split(root, "train", num_classes=14)
  lab = json.loads((root / "labels.json").read_text())
  lab["labels"]["r4"] = [1, 0]
  (root / "labels.json").write_text(json.dumps(lab))
  with pytest.raises(DataError, match=r"entry 'r4' has 2 values, expected 3"):
    records.load_split(root, "train")
  plain = {k: v for k, v in lab["labels"].items() if k not in ("r4", "r5")}
  (root / "labels.json").write_text(json.dumps(plain))
  with pytest.raises(DataError, match=r"no entry 'r4' for record 'r4'"):
    records.load_split(root, "train")
  plain["r4"] = plain["r5"] = ["a", "b", "c"]
  (root / "labels.json").write_text(json.dumps(plain))
  with pytest.raises(DataError, match=r"entry 'r4' is not a list of numbers"):
    records.load_split(root, "train")


def test_folder_source_raw_examples(tmp_path):
  root = make_r2gen_folder(tmp_path, views=2)
  recs = records.load_split(root, "test", num_views=2)
  src = records.FolderSource(recs)
  assert len(src) == 3
  ex = src[1]
  assert ex["id"] == "r10" and ex["report"] == recs[1].report
  assert ex["images"][1] == (root / "images" / "r10" / "1.png").read_bytes()
  assert ex["image_names"] == recs[1].image_paths


def make_csv_dataset(root: pathlib.Path, rows: list[dict[str, str]],
                     columns: tuple[str, ...] = ("Image", "Category", "fold", "Impression"),
                     images: bool = True) -> pathlib.Path:
  """A RadGen CSV (``root/data.csv``) with the given rows, and an image ``root/images/<Image>`` per row."""
  import csv  # pylint: disable=g-import-not-at-top

  with open(root / "data.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  if images:
    for i, r in enumerate(rows):
      if r.get("Image", "").strip():
        make_image(root / "images" / r["Image"].strip(), "L", seed=i)
  return root / "data.csv"


def test_csv_reader_rules(tmp_path, caplog):
  rows = [{"Image": " a.png ", "Category": "TB", "fold": "3", "Impression": "  Right   upper\n lobe\tcavity.  "},
          {"Image": "b.png", "Category": "Normal", "fold": "0", "Impression": ""},
          {"Image": "", "Category": "Normal", "fold": "1", "Impression": "dropped: no image"},
          {"Image": "c.png", "Category": "", "fold": "1", "Impression": "dropped: no category"},
          {"Image": "d.png", "Category": "Pneumonia", "fold": "4", "Impression": "Consolidation."}]
  path = make_csv_dataset(tmp_path, rows)
  with caplog.at_level(logging.WARNING):
    recs = records.read_csv(path, tmp_path / "images")
  assert "Dropped 2 row(s)" in caplog.text
  assert [r.id for r in recs] == ["a.png", "b.png", "d.png"]
  assert [r.report for r in recs] == ["Right upper lobe cavity.", "no finding", "Consolidation."]
  assert [r.label for r in recs] == [2, 0, 1] and [r.fold for r in recs] == [3, 0, 4]
  np.testing.assert_array_equal(np.stack([r.labels for r in recs]), [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
  assert recs[0].image_paths == (str(tmp_path / "images" / "a.png"),)
  # A configurable map (two classes, TB folded into class 1 by a wildcard); no fold column -> fold -1.
  path = make_csv_dataset(tmp_path, rows, columns=("Image", "Category", "Impression"), images=False)
  recs = records.read_csv(path, tmp_path / "images", class_map=(("Normal", ("Normal",)), ("Abnormal", ("*",))))
  assert [r.label for r in recs] == [1, 0, 1] and [r.fold for r in recs] == [-1, -1, -1]
  assert recs[0].labels.tolist() == [0.0, 1.0]
  raw = records.FolderSource(recs)[1]
  assert raw["label"] == 0 and raw["images"][0] == (tmp_path / "images" / "b.png").read_bytes()


def test_csv_reader_errors_name_the_row(tmp_path, caplog):
  rows = [{"Image": f"i{i}.png", "Category": "Normal", "fold": str(i % 5), "Impression": "x"} for i in range(4)]
  path = make_csv_dataset(tmp_path, rows)
  (tmp_path / "images" / "i2.png").unlink()
  with pytest.raises(DataError, match=r"row 4 of CSV .*data\.csv \(image 'i2\.png'\): image file not found"):
    records.read_csv(path, tmp_path / "images")
  with caplog.at_level(logging.WARNING):
    assert [r.id for r in records.read_csv(path, tmp_path / "images", on_bad_record="skip")] == ["i0.png", "i1.png",
                                                                                                   "i3.png"]
  assert "row 4 of CSV" in caplog.text
  for bad, match in [({"Category": "COVID"}, r"row 3 .*\['COVID'\] match no class"),
                     ({"fold": "x"}, r"row 3 .*fold 'x' is not a non-negative integer"),
                     ({"fold": "-1"}, r"row 3 .*fold '-1'"),
                     ({"Image": "i0.png"}, r"row 3 .*listed again \(first on row 2\)")]:
    edited = [dict(r) for r in rows]
    edited[1].update(bad)
    make_csv_dataset(tmp_path, edited, images=False)
    with pytest.raises(DataError, match=match):
      records.read_csv(path, tmp_path / "images", on_bad_record="skip")
  make_csv_dataset(tmp_path, rows, columns=("Image", "fold", "Impression"), images=False)
  with pytest.raises(DataError, match=r"lacks column\(s\) \['Category'\]"):
    records.read_csv(path, tmp_path / "images")
  with pytest.raises(DataError, match="CSV .*nowhere.csv not found"):
    records.read_csv(tmp_path / "nowhere.csv", tmp_path / "images")


def test_sample_single_label_class_map_counts():
  counts = {}
  for split in records.SPLITS:
    recs = records.load_split("", split, class_map=records.SAMPLE_CLASS_MAP)
    counts[split] = np.bincount([r.label for r in recs], minlength=3).tolist()
    assert all(r.labels.shape == (15,) for r in recs)  # the finding vectors are kept
  assert counts == {"train": [3, 87, 57], "val": [0, 8, 13], "test": [1, 31, 19]}
  first = records.load_split("", "train", class_map=records.SAMPLE_CLASS_MAP)[0]
  assert first.id == "p5_1a22778f" and first.label == 2  # ARDS alone -> other pneumonia


def test_class_map_priority_and_errors(tmp_path):
  root = make_r2gen_folder(tmp_path, num_classes=3, labels_form="classes")  # record i: [(i + c) % 2 for c]
  # r0 = {c1}, r1 = {c0, c2}: c2 before c0 in priority -> r1 is class 0 (named "two").
  cmap = records.parse_class_map([["two", ["c2"]], ["one", ["c1"]], ["zero", ["c0"]]])
  assert cmap == (("two", ("c2",)), ("one", ("c1",)), ("zero", ("c0",)))
  recs = records.load_split(root, "train", class_map=cmap)
  assert [r.label for r in recs] == [1, 0, 1, 0, 1, 0]
  with pytest.raises(DataError, match=r"record 'r0' .*\['c1'\] match no class"):
    records.load_split(root, "train", class_map=(("two", ("c2",)),))
  with pytest.raises(DataError, match=r"names \['c9'\], which labels .*labels.json does not have"):
    records.load_split(root, "train", class_map=(("x", ("c9",)),))
  for bad in ((("a", ()),), (("a", ("c0",)), ("a", ("c1",))), "abc", ((1, ("c0",)),), {"TB": ["c0"]},
              (("a", "c0"),)):
    with pytest.raises(DataError, match="config.data.class_map"):
      records.parse_class_map(bad)
  plain = make_r2gen_folder(tmp_path / "plain", num_classes=3)
  with pytest.raises(DataError, match="class_map maps finding names.*'classes'"):
    records.load_split(plain, "train", class_map=cmap)
