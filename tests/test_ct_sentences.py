"""ct_sentences: the rule-based labeler and per-abnormality sentence extractor of ct_agrg_spec.md §9.3 on
hand-written CT-RATE-style sentences, and its command line (§9.2 CSV, coverage, error lines)."""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import ct_rate, ct_sentences
from input_pipeline.ct_rate import ABNORMALITIES

REPO = pathlib.Path(__file__).resolve().parents[1]
K = len(ABNORMALITIES)
IDX = {name: k for k, name in enumerate(ABNORMALITIES)}


def _names(vector: np.ndarray) -> set[str]:
  return {ABNORMALITIES[k] for k in np.flatnonzero(vector)}


POSITIVE = [
    ("A port catheter is seen in the right subclavian vein.", {"Medical material"}),
    ("Sternotomy wires and surgical clips are noted.", {"Medical material"}),
    ("Atherosclerotic calcifications are observed in the thoracic aorta.", {"Arterial wall calcification"}),
    ("Cardiomegaly is present.", {"Cardiomegaly"}),
    ("Heart size is increased.", {"Cardiomegaly"}),
    ("Minimal pericardial effusion is observed.", {"Pericardial effusion"}),
    ("Coronary artery calcification is present.", {"Coronary artery wall calcification"}),
    ("A small hiatal hernia is seen.", {"Hiatal hernia"}),
    ("Mediastinal lymph nodes with a short axis of 12 mm are observed.", {"Lymphadenopathy"}),
    ("Conglomerate lymph nodes in the right hilum.", {"Lymphadenopathy"}),
    ("Centrilobular emphysematous changes with bullae in both upper lobes.", {"Emphysema"}),
    ("Subsegmental atelectasis in the left lower lobe.", {"Atelectasis"}),
    ("Fibroatelectasis in the lingula.", {"Atelectasis"}),
    ("A 4.5 mm nodule in the right upper lobe.", {"Lung nodule"}),
    ("Ground-glass opacities in both lungs.", {"Lung opacity"}),
    ("Fibrotic sequelae and parenchymal bands in the right middle lobe.", {"Pulmonary fibrotic sequela"}),
    ("Bilateral pleural effusion is present.", {"Pleural effusion"}),
    ("Mosaic attenuation pattern in both lungs.", {"Mosaic attenuation pattern"}),
    ("Peribronchial thickening is noted in the lower lobes.", {"Peribronchial thickening"}),
    ("Consolidation in the left lower lobe.", {"Consolidation"}),
    ("Cylindrical bronchiectasis in the right lower lobe.", {"Bronchiectasis"}),
    ("Interlobular septal thickening in both lungs.", {"Interlobular septal thickening"}),
    # Several abnormalities in one sentence; a sentence attributed to several.
    ("Ground-glass opacity and consolidation in the right lower lobe.", {"Lung opacity", "Consolidation"}),
    ("Calcific plaques in the aorta and coronary arteries.",
     {"Arterial wall calcification", "Coronary artery wall calcification"}),
    # Coronary only: not arterial wall calcification; other vessels without "coronary": not coronary.
    ("Calcified plaques in the coronary arteries.", {"Coronary artery wall calcification"}),
    ("Coronary arterial wall calcifications.", {"Coronary artery wall calcification"}),
    ("Atheromatous plaques in the carotid arteries.", {"Arterial wall calcification"}),
    # Hedges count as positive.
    ("Findings compatible with early emphysema.", {"Emphysema"}),
    ("Possible atelectasis in the right lower lobe.", {"Atelectasis"}),
    ("Suspicious for a nodule in the left upper lobe.", {"Lung nodule"}),
    # Clause-level negation: the other clause keeps its finding.
    ("No pleural effusion, but atelectasis in the left lower lobe.", {"Atelectasis"}),
    ("Atelectasis in the left lower lobe, no consolidation.", {"Atelectasis"}),
    ("Atelectasis is seen, however consolidation was not observed.", {"Atelectasis"}),
    ("Emphysema is seen; no bullae.", {"Emphysema"}),
    ("Bilateral pleural effusion without pneumothorax.", {"Pleural effusion"}),
]

NEGATIVE = [
    "No pleural effusion or pneumothorax was detected.",
    "Pericardial effusion-thickening was not observed.",
    "Heart size is normal.",
    "Heart size is not increased.",
    "No lymphadenopathy.",
    "No mass or infiltrative lesion was detected in both lungs.",
    "There is no consolidation or nodule in either lung.",
    "No calcification in the coronary arteries.",
    "Mediastinal lymph nodes measuring 8 mm, within normal limits.",
    "Without evidence of bronchiectasis.",
    "Absence of hiatal hernia.",
    "Trachea and both main bronchi are open.",
    "Mediastinal main vascular structures are normal.",  # a vessel word without calcification
]


@pytest.mark.parametrize("sentence,expected", POSITIVE, ids=[s[:40] for s, _ in POSITIVE])
def test_label_report_positive(sentence, expected):
  labels = ct_sentences.label_report(sentence)
  assert labels.dtype == np.float32 and labels.shape == (K,)
  assert _names(labels) == expected


def test_every_abnormality_is_covered_by_a_positive_sentence():
  assert set().union(*(e for _, e in POSITIVE)) == set(ABNORMALITIES)


@pytest.mark.parametrize("sentence", NEGATIVE, ids=[s[:40] for s in NEGATIVE])
def test_label_report_negative(sentence):
  assert _names(ct_sentences.label_report(sentence)) == set()


def test_sentence_splitting_keeps_decimals_and_splits_on_semicolons():
  text = "A 4.5 mm nodule and a 2.3 cm consolidation.  Bilateral pleural effusion; atelectasis...\nEnd"
  assert ct_sentences.split_sentences(text) == ["A 4.5 mm nodule and a 2.3 cm consolidation",
                                                "Bilateral pleural effusion", "atelectasis", "End"]
  assert ct_sentences.split_sentences(" . ;  ") == []
  assert _names(ct_sentences.label_report("No effusion. A 4.5 mm nodule.")) == {"Lung nodule"}


def test_label_report_of_a_whole_report_and_a_cleaned_generated_report():
  report = ("Heart size is normal. No pleural effusion or pneumothorax was detected. Calcific atheroma plaques "
            "in the aorta and coronary arteries. A 4.5 mm nodule in the right upper lobe; ground-glass opacity.")
  expected = {"Arterial wall calcification", "Coronary artery wall calcification", "Lung nodule", "Lung opacity"}
  assert _names(ct_sentences.label_report(report)) == expected
  generated = "calcific atheroma plaques are seen in the aorta. heart size is increased."  # cleaned style
  assert _names(ct_sentences.label_report(generated)) == {"Arterial wall calcification", "Cardiomegaly"}
  assert _names(ct_sentences.label_report("No abnormalities detected.")) == set()


def _labels(*names: str) -> np.ndarray:
  y = np.zeros(K, np.float32)
  y[[IDX[n] for n in names]] = 1
  return y


def test_extract_sentences():
  findings = ("Heart size is increased. Calcific plaques in the aorta and coronary arteries. No pleural effusion was "
              "detected. A 4.5 mm nodule in the right upper lobe; ground-glass opacity. Minimal pericardial "
              "effusion. Another nodule of 3 mm in the left lower lobe.")
  impressions = "Bilateral pleural effusion. Emphysema."
  labels = _labels("Cardiomegaly", "Arterial wall calcification", "Coronary artery wall calcification", "Lung nodule",
                   "Lung opacity", "Pleural effusion", "Consolidation")  # Pericardial effusion and Emphysema: 0
  out = ct_sentences.extract_sentences(findings, impressions, labels)
  assert out == {
      IDX["Cardiomegaly"]: "Heart size is increased.",
      IDX["Arterial wall calcification"]: "Calcific plaques in the aorta and coronary arteries.",
      IDX["Coronary artery wall calcification"]: "Calcific plaques in the aorta and coronary arteries.",
      IDX["Lung nodule"]: "A 4.5 mm nodule in the right upper lobe. Another nodule of 3 mm in the left lower lobe.",
      IDX["Lung opacity"]: "ground-glass opacity.",
      IDX["Pleural effusion"]: "Bilateral pleural effusion.",  # negated in Findings: Impressions as fallback
  }  # Consolidation: label-positive but no sentence → no entry; label-negative ones never
  assert ct_sentences.extract_sentences(findings, "", np.zeros(K)) == {}
  with pytest.raises(ValueError, match="0/1"):
    ct_sentences.extract_sentences(findings, "", np.full(K, 0.5))


def test_coverage():
  labels = np.stack([_labels("Cardiomegaly", "Emphysema"), _labels("Cardiomegaly"), np.zeros(K)])
  stats = ct_sentences.coverage(labels, [{IDX["Cardiomegaly"]: "x."}, {}, {}])
  assert stats.volumes == 3
  assert stats.positives[IDX["Cardiomegaly"]] == 2 and stats.covered[IDX["Cardiomegaly"]] == 1
  assert stats.positives[IDX["Emphysema"]] == 1 and stats.covered[IDX["Emphysema"]] == 0
  fractions = stats.fractions()
  assert fractions[IDX["Cardiomegaly"]] == 0.5 and fractions[IDX["Emphysema"]] == 0
  assert np.isnan(fractions[IDX["Consolidation"]])
  table = stats.table().splitlines()
  assert len(table) == K + 1 and "50.0%" in table[1 + IDX["Cardiomegaly"]]
  assert table[1 + IDX["Consolidation"]].endswith("-")


# --- command line --------------------------------------------------------------------------------------------

def _write(path: pathlib.Path, header, rows) -> pathlib.Path:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def _labels_csv(path: pathlib.Path, table: dict[str, np.ndarray], columns=ABNORMALITIES) -> pathlib.Path:
  return _write(path, ["VolumeName", *columns],
                [[n, *[int(y[IDX[c]]) for c in columns]] for n, y in table.items()])


REPORT_1 = ('Heart size is increased. "Calcific plaques" in the aorta and coronary arteries, no pleural effusion.\n'
            "A 4.5 mm nodule in the right upper lobe.")
LABELS_1 = _labels("Cardiomegaly", "Arterial wall calcification", "Coronary artery wall calcification",
                   "Lung nodule", "Emphysema")


def test_cli_end_to_end(tmp_path):
  reports = _write(tmp_path / "reports.csv", ["VolumeName", "Findings_EN", "Impressions_EN"], [
      ["train_1_a_1.nii.gz", REPORT_1, "Mild emphysema."],
      ["train_1_a_2.nii.gz", REPORT_1, "Mild emphysema."],  # second reconstruction of the same accession
      ["train_2_a_1.nii.gz", "Heart size is normal. No pleural effusion was detected.", "Normal study."]])
  labels = _labels_csv(tmp_path / "labels.csv", {"train_1_a_1.nii.gz": LABELS_1, "train_1_a_2.nii.gz": LABELS_1,
                                                 "train_2_a_1.nii.gz": np.zeros(K)})
  out = tmp_path / "out" / "sentences.csv"
  proc = subprocess.run([sys.executable, "-m", "input_pipeline.ct_sentences", "--reports", str(reports),
                         "--labels", str(labels), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == f"wrote 5 sentence rows for 2 accessions to {out}"
  cardio = next(line for line in lines if line.startswith("Cardiomegaly "))
  assert cardio.split()[1:] == ["1", "1", "100.0%"]
  rows = ct_rate.read_sentences(out)
  assert [(r.volume_name, r.abnormality, r.text) for r in rows] == [
      ("train_1_a_1.nii.gz", "Arterial wall calcification",
       '"Calcific plaques" in the aorta and coronary arteries, no pleural effusion.'),
      ("train_1_a_1.nii.gz", "Cardiomegaly", "Heart size is increased."),
      ("train_1_a_1.nii.gz", "Coronary artery wall calcification",
       '"Calcific plaques" in the aorta and coronary arteries, no pleural effusion.'),
      ("train_1_a_1.nii.gz", "Emphysema", "Mild emphysema."),
      ("train_1_a_1.nii.gz", "Lung nodule", "A 4.5 mm nodule in the right upper lobe."),
  ]
  slots = ct_rate.text_slots(rows, ct_rate.read_labels(labels))  # what stage 2 reads
  assert slots["train_1_a"][IDX["Arterial wall calcification"]] == (
      "<|endoftext|>calcific plaques in the aorta and coronary arteries no pleural effusion .<|endoftext|>")
  assert slots["train_2_a"] == ("",) * K


def test_cli_error_lines(tmp_path, capsys):
  reports = _write(tmp_path / "reports.csv", ["VolumeName", "Findings_EN"], [["train_1_a_1.nii.gz", REPORT_1]])
  columns = [c for c in ABNORMALITIES if c != "Lung nodule"]
  labels = _labels_csv(tmp_path / "labels.csv", {"train_1_a_1.nii.gz": LABELS_1}, columns)
  out = tmp_path / "sentences.csv"
  argv = ["--reports", str(reports), "--labels", str(labels), "--out", str(out)]
  assert ct_sentences.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: labels CSV") and "['Lung nodule']" in err[0]
  assert str(labels) in err[0] and not out.exists()
  other = _labels_csv(tmp_path / "other.csv", {"train_5_a_1.nii.gz": LABELS_1})
  assert ct_sentences.main(["--reports", str(reports), "--labels", str(other), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "train_5_a_1.nii.gz, which has no row in reports CSV" in err[0]
