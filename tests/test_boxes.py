"""boxes + features: annotation box fields (both formats, every validation error), slot selection, the lesion
crops of align2gen_spec.md §2.6 (test vectors §16.3/§16.4, pixels against a literal numpy re-implementation), the
VinDr CSV converter CLI, and the ``lesion_regions`` feature in the Grain pipeline (eval padding, train resume)."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import PIL.Image
import pytest
from conftest import tiny_config
from test_records import make_r2gen_folder

from input_pipeline import boxes, features, loader, records
from input_pipeline.records import DataError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _parse(fields, box_format="coco_xywh"):
  return boxes.parse_box_fields(fields, box_format=box_format, where="record 'r7' (split 'train' of A.json)")


def _regions(image, xywh, *, width, height, **kw):
  box_set = _parse({"boxes": xywh, "height": height, "width": width})
  return boxes.region_crops(image, box_set.xyxy, box_set.valid, width=width, height=height, **kw)


# --- a literal re-implementation of spec §2.6 steps 1-5 (torchvision's PIL code paths, CHW like the original) ---

def reference_regions(image, xywh, *, width, height, out_size, global_size, box_crop, pad_fix):
  arr = np.asarray(image.convert("RGB"))
  out = []
  for x, y, w, h in xywh:
    placeholder = np.full((3, out_size, out_size), 1e-8, np.float32)
    if [x, y, w, h] == [-1, -1, -1, -1]:
      out.append(placeholder)
      continue
    if box_crop == "code":
      s_x, s_y = global_size / width, global_size / height
      x0, y0, x1, y1 = int(x * s_x), int(y * s_y), int((x + w) * s_x), int((y + h) * s_y)
    else:
      x0, y0, x1, y1 = x, y, x + w, y + h
    if not (x1 > x0 and y1 > y0):
      out.append(placeholder)
      continue
    crop = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)  # PIL crop: zero outside the image
    ys, xs = slice(max(y0, 0), min(y1, arr.shape[0])), slice(max(x0, 0), min(x1, arr.shape[1]))
    if ys.stop > ys.start and xs.stop > xs.start:
      crop[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = arr[ys, xs]
    pixels = crop.reshape(-1, 3)
    mu, sd = pixels.mean(0) / 255, np.maximum(pixels.std(0) / 255, 0.01)
    if np.allclose(mu, 0, atol=1e-2):
      mu, sd = np.asarray(IMAGENET[0]), np.asarray(IMAGENET[1])
    h_r, w_r = crop.shape[:2]
    m = max(w_r, h_r)
    if box_crop == "code" and not pad_fix:  # the helper's (height, width) mix-up
      left, top = (m - h_r) // 2, (m - w_r) // 2
      right, bottom = m - h_r - left, m - w_r - top
    else:
      left, top = (m - w_r) // 2, (m - h_r) // 2
      right, bottom = m - w_r - left, m - h_r - top
    padded = np.pad(crop, ((top, bottom), (left, right), (0, 0)))
    resized = PIL.Image.fromarray(padded).resize((out_size, out_size), PIL.Image.BILINEAR)
    t = np.asarray(resized).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    out.append((t - mu.astype(np.float32)[:, None, None]) / sd.astype(np.float32)[:, None, None])
  return np.stack(out).transpose(0, 2, 3, 1)


# --- spec §16.3: box → crop rule ----------------------------------------------------------------------------

def test_spec_crop_vectors():
  frame = {"width": 2000, "height": 2500, "image_size": (2000, 2500), "global_size": 384}
  box = _parse({"boxes": [[500, 1000, 400, 300], [10, 10, 3, 3]], "height": 2500, "width": 2000}).xyxy
  assert boxes.crop_box(box[0], box_crop="code", **frame) == (96, 153, 172, 199)  # 76 x 46
  assert boxes.square_padding(76, 46, fix=False) == (15, 0, 15, 0)  # → 106 x 46, not square
  assert boxes.crop_box(box[0], box_crop="corrected", **frame) == (500, 1000, 900, 1300)
  assert boxes.square_padding(400, 300, fix=True) == (0, 50, 0, 50)  # → 400 x 400
  assert boxes.square_padding(30, 50, fix=False) == (0, 10, 0, 10)  # → 30 x 70
  assert boxes.square_padding(30, 50, fix=True) == (10, 0, 10, 0)
  assert boxes.crop_box(box[1], box_crop="code", **frame) == (1, 1, 2, 1)  # y1 == y0: placeholder
  # Corrected crops map the annotation frame onto the image when their sizes differ (here half size).
  assert boxes.crop_box(box[0], box_crop="corrected", **{**frame, "image_size": (1000, 1250)}) == (250, 500, 450, 650)


def test_placeholders_and_output_shape():
  image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (2500, 2000), np.uint8))
  regions, valid = _regions(image, [[500, 1000, 400, 300], [10, 10, 3, 3], [-1, -1, -1, -1]], width=2000,
                            height=2500, out_size=24)
  assert regions.shape == (3, 24, 24, 3) and regions.dtype == np.float32
  np.testing.assert_array_equal(valid, [True, False, False])
  assert (regions[1:] == np.float32(1e-8)).all() and not (regions[0] == np.float32(1e-8)).all()


# --- spec §16.4: region normalisation -----------------------------------------------------------------------

def test_gray_and_black_crop_normalisation():
  gray = PIL.Image.new("L", (2000, 2500), 128)
  mean, std = boxes.crop_statistics(gray.crop((96, 153, 172, 199)))
  np.testing.assert_allclose(mean, 128 / 255)
  np.testing.assert_allclose(std, 0.01)
  regions, _ = _regions(gray, [[500, 1000, 400, 300]], width=2000, height=2500, out_size=64)
  r = regions[0]
  assert (r[:, 32] == 0.0).all()  # interior
  np.testing.assert_allclose(r[:, 0], -50.196, atol=1e-3)  # left padding (15 of 106 columns)
  np.testing.assert_allclose(r[:, -1], -50.196, atol=1e-3)
  black = PIL.Image.new("RGB", (2000, 2500))
  regions, _ = _regions(black, [[500, 1000, 400, 300]], width=2000, height=2500, out_size=8)
  for c, v in enumerate((-2.1179, -2.0357, -1.8044)):
    np.testing.assert_allclose(regions[0, ..., c], v, atol=1e-4)


@pytest.mark.parametrize("box_crop,pad_fix", [("code", False), ("code", True), ("corrected", False)])
def test_region_pixels_match_literal_reference(box_crop, pad_fix):
  rng = np.random.default_rng(1)
  image = PIL.Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8))
  xywh = [[0, 0, 40, 48], [3, 5, 20, 9], [-1, -1, -1, -1], [30, 2, 10, 30], [11, 40, 7, 8], [1, 1, 1, 1]]
  kw = {"width": 40, "height": 48, "out_size": 20, "global_size": 64, "box_crop": box_crop, "pad_fix": pad_fix}
  got, valid = _regions(image, xywh, **kw)
  want = reference_regions(image, xywh, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(valid, ~(want == np.float32(1e-8)).all(axis=(1, 2, 3)))
  assert valid[0] and not valid[2]
  # global_size 64 > 40 x 48: the code-mode crops run past the image (zero fill) and differ from corrected ones.
  gray, _ = _regions(image.convert("L"), xywh, **kw)
  np.testing.assert_allclose(gray, reference_regions(image.convert("L"), xywh, **kw), rtol=1e-6, atol=1e-5)


# --- parsing and validation ---------------------------------------------------------------------------------

def test_formats_agree_and_empty_slots():
  a = _parse({"boxes": [[2, 3, 10, 20], [-1, -1, -1, -1], [0, 0, 40, 48]], "scores": [0.9, 0.0, 0.5],
              "height": 48, "width": 40})
  b = _parse({"boxes": [[2, 3, 12, 23], [-1, -1, -1, -1], [0, 0, 40, 48]], "scores": [0.9, 0.0, 0.5],
              "height": 48, "width": 40}, "xyxy")
  for x in (a, b):
    np.testing.assert_array_equal(x.xyxy, [[2, 3, 12, 23], [-1, -1, -1, -1], [0, 0, 40, 48]])
    np.testing.assert_array_equal(x.valid, [True, False, True])
    np.testing.assert_array_equal(x.scores, [0.9, 0.0, 0.5])
    assert (x.height, x.width) == (48, 40)
  assert _parse({"id": "r7", "report": "x"}) is None
  no_scores = _parse({"boxes": [], "height": 4, "width": 5.0})
  assert no_scores.xyxy.shape == (0, 4) and no_scores.width == 5
  np.testing.assert_array_equal(_parse({"boxes": [[1, 1, 2, 2]], "height": 4, "width": 4}).scores, [1.0])
  with pytest.raises(ValueError, match="box_format='xywh'"):
    _parse({"boxes": []}, "xywh")


@pytest.mark.parametrize("fields,match", [
    ({"boxes": [[1, 1, 2, 2]], "width": 10}, r"lacks \['height'\]"),
    ({"scores": [1.0], "height": 9, "width": 9}, r"lacks \['boxes'\]"),
    ({"boxes": [], "height": 0, "width": 10}, "height = 0 is not a positive integer"),
    ({"boxes": [], "height": 10, "width": 10.5}, "width = 10.5 is not a positive integer"),
    ({"boxes": [], "height": True, "width": 10}, "height = True"),
    ({"boxes": {"a": 1}, "height": 10, "width": 10}, "boxes must be a list"),
    ({"boxes": [[1, 1, 2, 2], [1, 1, 2]], "height": 10, "width": 10}, r"boxes\[1\] = \[1, 1, 2\] is not a list of 4"),
    ({"boxes": [[1, "1", 2, 2]], "height": 10, "width": 10}, r"boxes\[0\] .* finite numbers"),
    ({"boxes": [[1, float("nan"), 2, 2]], "height": 10, "width": 10}, r"boxes\[0\] .* finite numbers"),
    ({"boxes": [[1, 1, 0, 2]], "height": 10, "width": 10}, r"boxes\[0\] = \[1, 1, 0, 2\] .* no positive width"),
    ({"boxes": [[0, 0, 1, 1], [-2, 1, 3, 3]], "height": 10, "width": 10}, r"boxes\[1\] .* not inside the 10 x 10"),
    ({"boxes": [[8, 1, 3, 3]], "height": 10, "width": 10}, r"boxes\[0\] .* not inside"),
    ({"boxes": [[1, 8, 3, 3]], "height": 10, "width": 10}, r"boxes\[0\] .* not inside"),
    ({"boxes": [[1, 1, 2, 2]], "scores": [0.5, 0.2], "height": 10, "width": 10}, "scores must be a list of 1"),
    ({"boxes": [[1, 1, 2, 2]], "scores": ["a"], "height": 10, "width": 10}, r"scores\[0\] = 'a'"),
])
def test_validation_errors(fields, match):
  with pytest.raises(DataError, match=r"record 'r7' \(split 'train' of A.json\): .*" + match):
    _parse(fields)


def test_xyxy_errors_and_border():
  assert _parse({"boxes": [[7, 0, 3, 10]], "height": 10, "width": 10}).valid.all()  # touches both borders
  with pytest.raises(DataError, match=r"boxes\[0\] = \[5, 1, 3, 4\] \[x0, y0, x1, y1\] has no positive"):
    _parse({"boxes": [[5, 1, 3, 4]], "height": 10, "width": 10}, "xyxy")
  with pytest.raises(DataError, match=r"boxes\[0\] .* not inside"):
    _parse({"boxes": [[5, 1, 11, 4]], "height": 10, "width": 10}, "xyxy")


def test_select_boxes():
  b = _parse({"boxes": [[0, 0, 1, 1], [-1, -1, -1, -1], [1, 1, 1, 1], [2, 2, 1, 1]], "scores": [0.2, 0, 0.9, 0.5],
              "height": 9, "width": 9})
  xyxy, valid = boxes.select_boxes(b, max_boxes=6, min_box_score=0.0)  # fewer: slots kept, padded at the end
  np.testing.assert_array_equal(valid, [True, False, True, True, False, False])
  np.testing.assert_array_equal(xyxy[:4], b.xyxy)
  np.testing.assert_array_equal(xyxy[4:], -1)
  _, valid = boxes.select_boxes(b, max_boxes=4, min_box_score=0.3)  # low scores → empty slots in place
  np.testing.assert_array_equal(valid, [False, False, True, True])
  xyxy, valid = boxes.select_boxes(b, max_boxes=2, min_box_score=0.0)  # more: the top 2 by score, file order
  np.testing.assert_array_equal(xyxy, b.xyxy[[2, 3]])
  np.testing.assert_array_equal(valid, [True, True])
  xyxy, valid = boxes.select_boxes(b, max_boxes=3, min_box_score=0.6)
  np.testing.assert_array_equal(valid, [True, False, False])
  np.testing.assert_array_equal(xyxy[0], b.xyxy[2])


def test_load_split_reads_boxes_and_names_the_file(tmp_path):
  root = make_r2gen_folder(tmp_path, {"train": 3}, labels_form="")
  ann = json.loads((root / "annotation.json").read_text())
  ann["train"][0].update(boxes=[[1, 2, 3, 4]], scores=[0.7], height=48, width=40)
  ann["train"][2].update(boxes=[[30, 2, 20, 4]], height=48, width=40)
  (root / "annotation.json").write_text(json.dumps(ann))
  assert all(r.boxes is None for r in records.load_split(root, "train", labels=""))  # not read without a format
  with pytest.raises(DataError, match=rf"record 'r2' \(split 'train' of {root}/annotation.json\): boxes\[0\]"):
    records.load_split(root, "train", labels="", box_format="coco_xywh")
  recs = records.load_split(root, "train", labels="", box_format="coco_xywh", on_bad_record="skip")
  assert [r.id for r in recs] == ["r0", "r1"] and recs[1].boxes is None
  np.testing.assert_array_equal(recs[0].boxes.xyxy, [[1, 2, 4, 6]])
  assert records.FolderSource(recs)[0]["boxes"] is recs[0].boxes and "boxes" not in records.FolderSource(recs)[1]


# --- VinDr CSV → annotation -----------------------------------------------------------------------------------

def _vindr_folder(root: pathlib.Path) -> pathlib.Path:
  sizes = {"img_a.png": (40, 30), "img_b.png": (20, 20), "sub/x.png": (50, 60), "img_d.png": (10, 10)}
  for name, size in sizes.items():
    (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("L", size).save(root / "images" / name)
  recs = [{"id": rid, "report": "Heart normal.", "image_path": [p]}
          for rid, p in (("a", "img_a.png"), ("b", "img_b.png"), ("img_c", "sub/x.png"), ("d", "img_d.png"))]
  (root / "annotation.json").write_text(json.dumps({"train": recs[:3], "test": recs[3:]}))
  return root


CSV_HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
CSV_ROWS = ("img_a,Nodule/Mass,8,R1,1.5,2,11.5,12\n"
            "img_b,No finding,14,R2,,,,\n"
            "img_a,Aortic enlargement,0,R3,0,0,40,30\n"
            "img_c,Cardiomegaly,3,R1,10,20,30,25\n"
            "img_a,Pleural effusion,10,R2,5,5,6,6\n"
            "zzz,Cardiomegaly,3,R1,1,1,2,2\n")


def test_vindr_cli(tmp_path, capsys):
  root = _vindr_folder(tmp_path)
  (tmp_path / "vindr.csv").write_text(CSV_HEADER + CSV_ROWS)
  argv = ["vindr", "--csv", str(tmp_path / "vindr.csv"), "--annotation", str(root / "annotation.json"),
          "--out", str(tmp_path / "out.json")]
  assert boxes.main(argv + ["--max-boxes", "2"]) == 0
  summary = capsys.readouterr().out
  assert "4 records, 2 box slots each; 2 with boxes, 1 matched without boxes, 1 unmatched" in summary
  assert "1 truncated to 2 boxes; 1 CSV image(s) without a record" in summary
  out = json.loads((tmp_path / "out.json").read_text())
  a, b, c = out["train"]
  assert a["boxes"] == [[1.5, 2.0, 10.0, 10.0], [0.0, 0.0, 40.0, 30.0]] and a["scores"] == [1.0, 1.0]
  assert (a["width"], a["height"]) == (40, 30)
  assert b["boxes"] == [[-1, -1, -1, -1]] * 2 and (b["width"], b["height"]) == (20, 20)
  assert c["boxes"] == [[10.0, 20.0, 20.0, 5.0], [-1, -1, -1, -1]] and c["scores"] == [1.0, 0.0]
  assert out["test"][0]["boxes"] == [[-1, -1, -1, -1]] * 2 and out["test"][0]["width"] == 10
  loaded = records.load_split(tmp_path, "train", annotation="out.json", labels="", box_format="coco_xywh")
  np.testing.assert_array_equal(loaded[0].boxes.xyxy, [[1.5, 2, 11.5, 12], [0, 0, 40, 30]])
  assert boxes.main(argv) == 0 and len(json.loads((tmp_path / "out.json").read_text())["train"][0]["boxes"]) == 3
  capsys.readouterr()


@pytest.mark.parametrize("csv_text,match", [
    (CSV_HEADER + "img_a,Nodule,8,R1,1,2,abc,4\n", r"vindr.csv, row 2: x_max = 'abc' is not a number"),
    (CSV_HEADER + CSV_ROWS + "img_a,Nodule,8,R1,1,2,,4\n", r"row 8: x_max = '' is not a number"),
    (CSV_HEADER + "img_a,Nodule,8,R1,5,2,3,4\n", r"row 2: box \(5.0, 2.0, 3.0, 4.0\) needs"),
    (CSV_HEADER + "img_a,Nodule,8,R1,1,2,41,4\n", r"row 2: box .* not inside the 40 x 30 .* record 'a'"),
    ("image_id,class_name,x_min,y_min,x_max\n", r"missing column\(s\) \['y_max'\]"),
    ("image_id,class_name,x_min,y_min,x_max,y_max,width,height\nimg_a,Nodule,1,2,31,4,30,30\n",
     r"row 2: box .* not inside the 30 x 30"),
])
def test_vindr_cli_errors(tmp_path, capsys, csv_text, match):
  root = _vindr_folder(tmp_path)
  (tmp_path / "vindr.csv").write_text(csv_text)
  rc = boxes.main(["vindr", "--csv", str(tmp_path / "vindr.csv"), "--annotation", str(root / "annotation.json"),
                   "--out", str(tmp_path / "out.json")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
  assert re.search(match, err), err
  assert not (tmp_path / "out.json").exists()


# --- the lesion_regions feature in the Grain pipeline ------------------------------------------------------

def _box_config(root: pathlib.Path):
  c = tiny_config(num_classes=3)
  d = c.data
  d.data_dir, d.threshold, d.image_size, d.resize = str(root), 1, 32, 36
  d.features, d.max_boxes, d.region_size = ("lesion_regions",), 3, 16
  c.train.batch_size = 2
  return c


@pytest.fixture(scope="module")
def box_folder(tmp_path_factory):
  root = make_r2gen_folder(tmp_path_factory.mktemp("boxes"), {"train": 5, "val": 3, "test": 2})
  ann = json.loads((root / "annotation.json").read_text())
  rng = np.random.default_rng(0)
  for split in ann.values():
    for i, r in enumerate(split):
      xy = rng.integers(0, 20, (4, 2))
      wh = rng.integers(1, 20, (4, 2))
      entries = [[int(x), int(y), int(w), int(h)] for (x, y), (w, h) in zip(xy, wh)]
      entries[i % 4] = [-1, -1, -1, -1]
      r.update(boxes=entries, scores=rng.random(4).round(3).tolist(), height=48, width=40)
  (root / "annotation.json").write_text(json.dumps(ann))
  return root


def _expected(config, split):
  f = features.LesionRegions(config)
  out = {}
  for rec in records.load_split(config.data.data_dir, split, labels="labels.json", num_classes=3,
                                box_format="coco_xywh"):
    image = records.decode_image(records.read_bytes(rec.image_paths[0]), "test")
    xyxy, valid = boxes.select_boxes(rec.boxes, max_boxes=3, min_box_score=0.0)
    out[rec.id] = boxes.region_crops(image, xyxy, valid, width=40, height=48, out_size=16, global_size=32)
  assert out and f.padding()["regions"].shape == (3, 16, 16, 3)
  return out


def test_eval_batches_carry_regions(box_folder):
  c = _box_config(box_folder)
  tok = loader.build_tokenizer(c)
  want = _expected(c, "val")
  batches = list(loader.eval_batches(c, tok, "val"))
  assert len(batches) == 2
  for batch in batches:
    assert batch["regions"].shape == (2, 3, 16, 16, 3) and batch["regions"].dtype == np.float32
    assert batch["region_valid"].shape == (2, 3) and batch["region_valid"].dtype == bool
    for row, rid in enumerate(batch["ids"]):
      if not batch["valid"][row]:
        assert rid == "" and not batch["regions"][row].any() and not batch["region_valid"][row].any()
        continue
      np.testing.assert_array_equal(batch["regions"][row], want[rid][0])
      np.testing.assert_array_equal(batch["region_valid"][row], want[rid][1])
  assert not batches[1]["valid"][1]


def test_train_regions_ignore_augmentation_and_resume(box_folder):
  c = _box_config(box_folder)
  tok = loader.build_tokenizer(c)
  want = _expected(c, "train")
  ds = loader.train_dataset(c, tok, seed=5)
  it = iter(ds)
  first = [next(it) for _ in range(3)]  # epochs of 2 batches: crosses an epoch boundary
  for batch in first:
    for row, rid in enumerate(batch["ids"]):
      np.testing.assert_array_equal(batch["regions"][row], want[rid][0])
      np.testing.assert_array_equal(batch["region_valid"][row], want[rid][1])
  it2 = iter(ds)
  next(it2)
  state = it2.get_state()
  it3 = iter(ds)
  it3.set_state(state)
  for a in first[1:]:
    b = next(it3)
    assert a["ids"] == b["ids"] and all(np.array_equal(a[k], b[k]) for k in a if k != "ids")
  plain = tiny_config(num_classes=3)
  plain.data.data_dir, plain.data.threshold, plain.data.image_size, plain.data.resize = str(box_folder), 1, 32, 36
  plain.train.batch_size = 2
  batch = next(iter(loader.train_dataset(plain, tok, seed=5)))
  assert set(batch) == {"images", "targets", "masks", "labels", "ids"}
  np.testing.assert_array_equal(batch["images"], first[0]["images"])  # the features leave the draws unchanged


def test_feature_errors(box_folder, tmp_path):
  c = _box_config(box_folder)
  c.data.features = ("lesion_regions", "heatmaps")
  with pytest.raises(ValueError, match="heatmaps"):
    features.build(c, None, True)
  c.data.features = ("lesion_regions",)
  c.data.box_crop = "exact"
  with pytest.raises(ValueError, match="box_crop='exact'"):
    features.build(c, None, True)
  root = make_r2gen_folder(tmp_path, {"train": 2, "val": 1, "test": 1})
  c = _box_config(root)
  with pytest.raises(DataError, match="Record 'r2' has no box fields"):
    next(loader.eval_batches(c, loader.build_tokenizer(c), "val"))
