"""input_pipeline.synthetic_ct: the SYNTHETIC CT-RATE-layout data set (names, CSV columns, contract files,
manifest, determinism, ``ensure_dataset``), rendered abnormalities that agree with the labels, reports that state
exactly the labelled abnormalities, the stage-2 sentences CSVs and the GPT-2-style tokenizer."""

from __future__ import annotations

import csv
import json
import pathlib
import re

import numpy as np
import pytest

from input_pipeline import ct_rate, ct_sentences, subword, volumes
from input_pipeline import synthetic_ct as sc

TINY = dict(seed=3, num_train=4, num_val=1, num_test=1, shape=(12, 96, 96), prevalence=0.5, healthy_fraction=0.25)
SHAPE = (12, 192, 192)  # the smallest in-plane size the CT-Net encoder accepts
NAME = re.compile(r"^(train|valid)_(\d+)_([a-z])_(\d+)\.nii\.gz$")  # <split>_<patient>_<scan>_<recon> (spec §2.1)
METAL = 1500.0
CALCIUM = (400.0, METAL)


def _csv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    return list(reader.fieldnames or ()), list(reader)


def _split_files(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  return {folder: sorted((root / folder).glob("*/*/*.npz")) for folder in ("train", "valid")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
  return sc.write_dataset(tmp_path_factory.mktemp("synthetic") / "ct", **TINY)


def _render(seed: int, findings=(), shape=SHAPE) -> sc.Rendering:
  return sc.render(np.random.default_rng(seed), shape, findings)


# --- layout, CSVs, files, manifest ------------------------------------------------------------------------------

def test_layout_and_names(dataset):
  files = _split_files(dataset)
  assert len(files["train"]) == TINY["num_train"] + TINY["num_val"] and len(files["valid"]) == TINY["num_test"]
  for folder, paths in files.items():
    for path in paths:
      volume_name = ct_rate.label_key(path.name)
      split, patient, scan, recon = NAME.fullmatch(volume_name).groups()
      assert (split, scan, recon) == (folder, "a", "1")
      assert path.relative_to(dataset).parts == (folder, f"{split}_{patient}", f"{split}_{patient}_a", path.name)
  expected = {"train": [f"train_{p}_a_1.nii.gz" for p in range(1, 5)], "val": ["train_5_a_1.nii.gz"],
              "test": ["valid_1_a_1.nii.gz"]}
  paths = sc.dataset_paths(dataset)
  for split, names in expected.items():
    records = ct_rate.volume_records(paths[split]["volumes"], paths[split]["labels"])  # the loader's selection
    assert sorted(r.name[:-len(".npz")] for r in records) == sorted(names)
    for kind in ("labels", "metadata", "reports"):
      assert [row["VolumeName"] for row in _csv(paths[split][kind])[1]] == names


def test_csv_columns_and_values(dataset):
  paths = sc.dataset_paths(dataset)
  for split in sc.SPLITS:
    header, rows = _csv(paths[split]["labels"])
    assert header == ["VolumeName", *ct_rate.ABNORMALITIES]
    assert all(row[name] in ("0", "1") for row in rows for name in ct_rate.ABNORMALITIES)
    assert all(row[name] == "0" for row in rows for name in sc.NEVER_RENDERED)
    header, rows = _csv(paths[split]["metadata"])
    assert header == ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept", "PatientSex",
                      "PatientAge"]
    for row in rows:
      assert (row["XYSpacing"], row["ZSpacing"], row["RescaleSlope"], row["RescaleIntercept"]) == (
          "[0.75, 0.75]", "1.5", "1", "0")
      assert row["PatientSex"] in ("M", "F") and re.fullmatch(r"\d{3}Y", row["PatientAge"])
    header, rows = _csv(paths[split]["reports"])
    assert header == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    assert all(row[c] for row in rows for c in header)


def test_contract_volumes(dataset):
  for path in _split_files(dataset)["train"][:2]:
    with np.load(path) as z:
      assert list(z.keys()) == ["arr_0"]
      raw = z["arr_0"]
    assert raw.dtype == np.int16 and raw.shape == TINY["shape"]
    hu = volumes.load_contract_volume(path)  # the loader's cast: float32, same values
    assert hu.dtype == np.float32 and np.array_equal(hu, raw)
    assert hu[:, 0, 0].tolist() == [-1000.0] * TINY["shape"][0]  # air outside the body
    assert hu.max() > 300  # bone: HU, not CT-CLIP's [-1, 1] scaling


def test_manifest_and_readme(dataset):
  manifest = json.loads((dataset / "manifest.json").read_text())
  assert manifest["statement"] == "SYNTHETIC phantoms, not patient data"
  assert manifest["generator"] == sc.GENERATOR and manifest["version"] == sc.VERSION
  params = manifest["parameters"]
  assert {k: params[k] for k in ("seed", "num_train", "num_val", "num_test", "healthy_fraction")} == {
      k: TINY[k] for k in ("seed", "num_train", "num_val", "num_test", "healthy_fraction")}
  assert params["shape"] == list(TINY["shape"]) and params["prevalence"] == dict.fromkeys(sc.RENDERED, 0.5)
  assert manifest["rendered"] == list(sc.RENDERED) and manifest["never_present"] == list(sc.NEVER_RENDERED)
  paths = sc.dataset_paths(dataset)
  for split, entry in manifest["splits"].items():
    labels = np.array([[int(row[n]) for n in ct_rate.ABNORMALITIES] for row in _csv(paths[split]["labels"])[1]])
    assert entry["count"] == len(labels) and entry["healthy"] == int((labels.sum(1) == 0).sum())
    assert entry["prevalence"] == dict(zip(ct_rate.ABNORMALITIES, np.round(labels.mean(0), 4).tolist()))
    assert entry["sentences"] == paths[split]["sentences"].name
    assert entry["sentence_rows"] == len(_csv(paths[split]["sentences"])[1]) == labels.sum()
  # round(0.5 * 4) = 2 of the 3 non-healthy train volumes have each rendered abnormality
  assert manifest["splits"]["train"]["prevalence"]["Lung nodule"] == 0.5
  tokenizer = manifest["tokenizer"]
  assert tokenizer["folder"] == paths["train"]["tokenizer"].name == "gpt2_tokenizer"
  assert tokenizer["family"] == "gpt2" and tokenizer["endoftext_id"] == tokenizer["vocab_size"] - 1
  assert "SYNTHETIC" in (dataset / "README.md").read_text() and "NOT PATIENT DATA" in sc.__doc__


def test_sentences_csvs(dataset):
  """One row per label-positive abnormality (every one has a sentence: the reports state each with a lexicon
  keyword), its text the report's sentence(s) for it; stage 2 reads them as non-empty slots exactly there."""
  paths = sc.dataset_paths(dataset)
  for split in sc.SPLITS:
    header, rows = _csv(paths[split]["sentences"])
    assert header == list(ct_rate.SENTENCE_COLUMNS)
    labels = {row["VolumeName"]: row for row in _csv(paths[split]["labels"])[1]}
    positives = {(name, n) for name, row in labels.items() for n in ct_rate.ABNORMALITIES if row[n] == "1"}
    assert sorted((r["VolumeName"], r["AbnormalityName"]) for r in rows) == sorted(positives)
    reports = {row["VolumeName"]: row["Findings_EN"] for row in _csv(paths[split]["reports"])[1]}
    for r in rows:
      assert r["Findings_EN"].endswith(".") and r["Findings_EN"].split(". ")[0] in reports[r["VolumeName"]]
      assert ct_sentences.label_report(r["Findings_EN"])[ct_rate.ABNORMALITIES.index(r["AbnormalityName"])] == 1
    records = ct_rate.volume_records(paths[split]["volumes"], paths[split]["labels"], paths[split]["sentences"])
    assert len(records) == len(labels)
    for record in records:
      np.testing.assert_array_equal([t != "" for t in record.texts], record.labels == 1)


def test_gpt2_tokenizer(dataset):
  """The saved GPT-2-style tokenizer: <|endoftext|> its last id, a slot of a train sentence → [eot, …, eot]."""
  paths = sc.dataset_paths(dataset)
  assert all(paths[split]["tokenizer"] == dataset / "gpt2_tokenizer" for split in sc.SPLITS)
  tok = subword.load_tokenizer(paths["train"]["tokenizer"])
  eot = tok.token_to_id(ct_rate.ENDOFTEXT)
  assert tok.family == "gpt2" and eot == tok.eos_id == tok.vocab_size - 1 and tok.pad_id is None
  assert 257 < tok.vocab_size <= sc.GPT2_VOCAB_SIZE
  for row in _csv(paths["test"]["sentences"])[1] + _csv(paths["train"]["sentences"])[1][:3]:
    cleaned = ct_rate.clean_sentence_text(row["Findings_EN"])
    ids = ct_rate.encode_slot(tok, ct_rate.ENDOFTEXT + cleaned + ct_rate.ENDOFTEXT)
    assert ids[0] == ids[-1] == eot and eot not in ids[1:-1] and len(ids) > 2
    assert ct_rate.decode_sentence(tok, ids) == cleaned.replace(" .", ".")


def test_deterministic(dataset, tmp_path):
  again = sc.write_dataset(tmp_path / "again", **TINY)
  other = sc.write_dataset(tmp_path / "other", **{**TINY, "seed": TINY["seed"] + 1})
  files = [p.relative_to(dataset) for p in sorted(dataset.rglob("*")) if p.is_file()]
  assert files == [p.relative_to(again) for p in sorted(again.rglob("*")) if p.is_file()]
  for rel in files:
    assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel
  volume = pathlib.Path("train/train_1/train_1_a/train_1_a_1.nii.gz.npz")
  assert (dataset / volume).read_bytes() != (other / volume).read_bytes()
  assert (dataset / "train_reports.csv").read_bytes() != (other / "train_reports.csv").read_bytes()
  a, b = (sc.phantom(np.random.default_rng(7), TINY["shape"], ("Lung nodule",)) for _ in range(2))
  assert a.dtype == np.float32 and a.shape == TINY["shape"] and np.array_equal(a, b)
  assert np.array_equal(a, np.rint(a))


def test_ensure_dataset(tmp_path, monkeypatch):
  out = tmp_path / "data" / "synthetic_ct"
  assert sc.ensure_dataset(out, **TINY) == out
  stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

  def fail(*args, **kwargs):
    raise AssertionError("ensure_dataset rewrote an up-to-date set")

  monkeypatch.setattr(sc, "write_dataset", fail)
  assert sc.ensure_dataset(out, **TINY) == out  # up to date: nothing written
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
  monkeypatch.undo()
  sc.ensure_dataset(out, **{**TINY, "seed": 4, "num_test": 2})  # other parameters: regenerated in place
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["parameters"]["seed"] == 4 and len(_split_files(out)["valid"]) == 2
  assert sorted(p.name for p in out.parent.iterdir()) == ["synthetic_ct"]  # no temporary folder left
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "scan.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="not a synthetic_ct data set"):
    sc.ensure_dataset(foreign, **TINY)
  with pytest.raises(ValueError, match="not empty"):
    sc.write_dataset(foreign, **TINY)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="renders only"):
    _render(0, ("Lymphadenopathy",))
  with pytest.raises(ValueError, match="shape"):
    _render(0, (), (4, 192, 192))
  with pytest.raises(ValueError, match="renders only"):
    sc.ensure_dataset("unused", prevalence={"Bronchiectasis": 0.5})
  with pytest.raises(ValueError, match="prevalence"):
    sc.ensure_dataset("unused", prevalence=0.9, healthy_fraction=0.2)


def test_cli(tmp_path, capsys):
  out = tmp_path / "cli"
  assert sc.main(["--out", str(out), "--num_train", "2", "--num_val", "1", "--num_test", "1", "--shape", "6",
                  "48", "48"]) == 0
  assert "SYNTHETIC" in capsys.readouterr().out
  assert json.loads((out / "manifest.json").read_text())["parameters"]["shape"] == [6, 48, 48]


# --- rendered abnormalities agree with the labels ----------------------------------------------------------------

def _lungs(r: sc.Rendering) -> np.ndarray:
  return r.masks["right_lung"] | r.masks["left_lung"]


def _in_lungs(r: sc.Rendering, lo: float, hi: float) -> int:
  """Lung-mask voxels with lo <= HU < hi."""
  v = r.volume[_lungs(r)]
  return int(((v >= lo) & (v < hi)).sum())


def _shell(mask: np.ndarray, width: int) -> np.ndarray:
  """The in-plane ring of ``width`` voxels around ``mask``."""
  grown = mask.copy()
  for di in range(-width, width + 1):
    for dj in range(-width, width + 1):
      if di * di + dj * dj <= width * width:
        grown |= np.roll(mask, (di, dj), axis=(1, 2))
  return grown & ~mask


def test_lung_lesions_show_their_hu():
  healthy = _render(10)
  ranges = {"Lung nodule": (0, 90), "Consolidation": (0, 60), "Lung opacity": (-600, -400),
            "Emphysema": (-2000, -950), "Atelectasis": (-60, 40), "Pleural effusion": (-40, 60)}
  for lo, hi in ranges.values():
    assert _in_lungs(healthy, lo, hi) == 0  # aerated lung is -850 ± noise
  for seed, (name, (lo, hi)) in enumerate(ranges.items()):
    r = _render(20 + seed, (name,))
    assert _in_lungs(r, lo, hi) > (10 if name in ("Lung nodule", "Atelectasis") else 300), name
  nodules = _render(30, ("Lung nodule",))
  for nodule in nodules.details["Lung nodule"]["nodules"]:
    k, i, j = nodule["centre"]
    assert _lungs(nodules)[k, i, j] and 0 <= nodules.volume[k, i, j] <= 90
    assert nodule["diameter_mm"] in (4.5, 6.0, 7.5, 9.0)


def test_pleural_effusion_is_posterior_basal_and_on_its_side():
  for seed in range(40, 46):
    r = _render(seed, ("Pleural effusion",))
    side = r.details["Pleural effusion"]["side"]
    for name in ("right", "left"):
      lung = r.masks[f"{name}_lung"]
      fluid = lung & (r.volume > -40) & (r.volume < 60)
      assert fluid.any() == (side in (name, "bilateral")), (seed, side, name)
      if fluid.any():
        k, _, j = np.nonzero(fluid)
        lk, _, lj = np.nonzero(lung)
        assert k.mean() < lk.mean() and j.mean() > lj.mean()  # basal (inferior) and dependent (posterior)


def test_heart_findings():
  cardiomegaly = [_render(s, ("Cardiomegaly",)) for s in (50, 51, 52)]
  others = [_render(53), _render(54, ("Pericardial effusion",)), _render(55, ("Consolidation", "Hiatal hernia")),
            _render(56, ("Pleural effusion", "Lung opacity"))]
  assert min(r.masks["heart"].sum() for r in cardiomegaly) > max(r.masks["heart"].sum() for r in others)
  for r in cardiomegaly + others:
    assert abs(np.median(r.volume[r.masks["heart"]]) - sc.HEART) < 5  # the mask is the heart
  rim = [np.median(r.volume[_shell(r.masks["heart"], 3)]) for r in (others[0], others[1])]
  assert rim[0] < -60 and rim[1] > -30  # pericardial fat vs fluid right outside the heart


def _bright(r: sc.Rendering, region: str | None, lo: float, hi: float) -> bool:
  v = r.volume if region is None else r.volume[r.masks[region]]
  return bool(((v >= lo) & (v < hi)).any())


def test_location_tells_metal_and_calcium_apart():
  rng = np.random.default_rng(60)
  for seed in range(61, 73):
    findings = [name for name in sc.RENDERED if rng.random() < 0.4]
    r = _render(seed, findings)
    assert _bright(r, None, METAL, np.inf) == ("Medical material" in findings), findings
    assert _bright(r, "aorta", *CALCIUM) == ("Arterial wall calcification" in findings), findings
    assert _bright(r, "heart", *CALCIUM) == ("Coronary artery wall calcification" in findings), findings
    body_air = (r.volume < -900) & r.masks["body"] & ~_lungs(r)
    assert body_air[:int(0.35 * SHAPE[0])].any() == ("Hiatal hernia" in findings), findings  # below the bronchi


# --- reports state exactly the labelled abnormalities ------------------------------------------------------------

_CALCIFIED = r"(calcif|atheroscler|atheroma)"
KEYWORDS = {
    "Medical material": r"catheter", "Arterial wall calcification": rf"{_CALCIFIED}.*aort|aort.*{_CALCIFIED}",
    "Cardiomegaly": r"cardiomegaly|heart (size|contour).*(enlarged|increased)",
    "Pericardial effusion": r"pericardial effusion", "Coronary artery wall calcification": r"coronary",
    "Hiatal hernia": r"hiatal hernia", "Lymphadenopathy": r"lymphadenopath|enlarged lymph", "Emphysema": r"emphysema",
    "Atelectasis": r"atelecta", "Lung nodule": r"nodul", "Lung opacity": r"opacit|ground-glass|infiltrat",
    "Pulmonary fibrotic sequela": r"fibro|sequela", "Pleural effusion": r"pleural effusion",
    "Mosaic attenuation pattern": r"mosaic", "Peribronchial thickening": r"peribronchial|bronchial wall",
    "Consolidation": r"consolidat", "Bronchiectasis": r"bronchiecta",
    "Interlobular septal thickening": r"\bseptal thickening|interlobular",
}
NEGATION = re.compile(r"^no\b|\bnot\b|\bnormal\b|within normal limits", re.IGNORECASE)


def _stated(text: str) -> set[str]:
  """Abnormalities with a keyword in a sentence without a negation cue."""
  sentences = [s for s in re.split(r"(?<=\.)\s+", text) if s and not NEGATION.search(s)]
  return {name for name, word in KEYWORDS.items() if any(re.search(word, s, re.IGNORECASE) for s in sentences)}


def _reports() -> list[tuple[set[str], dict[str, str]]]:
  rng = np.random.default_rng(80)
  out = []
  for seed in range(40):
    findings = {name for name in sc.RENDERED if rng.random() < 0.35}
    r = _render(seed, findings, (6, 48, 48))
    out.append((findings, sc.report(np.random.default_rng(1000 + seed), r.details)))
  return out


def test_reports_state_exactly_the_findings(dataset):
  paths = sc.dataset_paths(dataset)
  written = []
  for split in sc.SPLITS:
    labels = {row["VolumeName"]: {n for n in ct_rate.ABNORMALITIES if row[n] == "1"}
              for row in _csv(paths[split]["labels"])[1]}
    written += [(labels[row["VolumeName"]], row) for row in _csv(paths[split]["reports"])[1]]
  for findings, text in written + _reports():
    assert _stated(text["Findings_EN"]) == findings, text["Findings_EN"]
    assert _stated(text["Impressions_EN"]) == findings, text["Impressions_EN"]
    assert "No pleural effusion or pneumothorax was detected." in text["Findings_EN"] or "Pleural effusion" in findings
    assert "Trachea and both main bronchi are" in text["Findings_EN"]


def test_reports_agree_with_the_rule_based_labeler():
  for findings, text in _reports():
    expected = np.array([name in findings for name in ct_rate.ABNORMALITIES], np.float32)
    for column in ("Findings_EN", "Impressions_EN"):
      np.testing.assert_array_equal(ct_sentences.label_report(text[column]), expected, err_msg=text[column])
