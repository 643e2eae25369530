"""ct_rate: CT-RATE keys, CSV tables, §2.6 sentence slots, cleaning (§13.7), tokenisation and collate (§13.9),
report assembly (§13.15), thresholds (§7.4).

The GPT-2 tokenizer files are made here: a tiny byte-level BPE with ``<|endoftext|>`` is trained with
``tokenizers`` and saved as vocab.json + merges.txt; ``transformers.GPT2Tokenizer`` read from the same files is
the reference for the slot encodings. Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import csv  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from input_pipeline import ct_rate, subword, tokenizer  # noqa: E402
from input_pipeline.ct_rate import ABNORMALITIES  # noqa: E402
from input_pipeline.records import DataError  # noqa: E402
from rrg_jax import cli  # noqa: E402

EOT = ct_rate.ENDOFTEXT
K = 18


def write_csv(path: pathlib.Path, header, rows) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def labels_rows(table: dict[str, set[int]]) -> list[list]:
  return [[name, *[int(k in positives) for k in range(K)]] for name, positives in table.items()]


def write_labels(path: pathlib.Path, table: dict[str, set[int]]) -> pathlib.Path:
  return write_csv(path, ["VolumeName", *ABNORMALITIES], labels_rows(table))


# --- names, keys ---------------------------------------------------------------------------------------------

def test_abnormalities_are_ct_rates_18_columns_in_order():
  assert len(ABNORMALITIES) == ct_rate.NUM_ABNORMALITIES == K == len(set(ABNORMALITIES))
  assert ABNORMALITIES[0] == "Medical material" and ABNORMALITIES[4] == "Coronary artery wall calcification"
  assert ABNORMALITIES[9] == "Lung nodule" and ABNORMALITIES[13] == "Mosaic attenuation pattern"
  assert ABNORMALITIES[17] == "Interlobular septal thickening"


def test_key_mapping_13_8():
  assert ct_rate.label_key("train_12_b_2.nii.gz.npz") == "train_12_b_2.nii.gz"
  assert ct_rate.label_key("/data/train_12/train_12_b/train_12_b_2.nii.gz.npz") == "train_12_b_2.nii.gz"
  assert ct_rate.accession_from_label_name("train_12_b_2.nii.gz") == "train_12_b"
  assert ct_rate.accession_from_sentence_name("train_12_b_2.nii.gz") == "train_12_b"
  assert ct_rate.accession_from_label_name("valid_3_a_1.nii.gz") == "valid_3_a"


@pytest.mark.parametrize("name", ["train_12_b", "train_12_b_2", "train_1a_1.nii.gz", "train_12_b_2.nii",
                                  "12_b_2.nii.gz", "train_x_b_2.nii.gz", ""])
def test_names_that_are_not_volume_names_are_refused(name):
  for fn in (ct_rate.accession_from_label_name, ct_rate.accession_from_sentence_name):
    with pytest.raises(DataError, match="volume name"):
      fn(name)
  with pytest.raises(DataError, match="volume file"):
    ct_rate.label_key(name + ".npz")


def test_label_key_needs_npz_suffix():
  with pytest.raises(DataError, match=r"train_1_a_1\.nii\.gz\.npy"):
    ct_rate.label_key("train_1_a_1.nii.gz.npy")


# --- cleaning ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cleaned", [
    ("Minimal pericardial effusion is observed.", "minimal pericardial effusion is observed ."),
    ("A 4.5 mm nodule (series 3/45) in the right upper lobe; ground-glass opacity. Atelectasis, left base!",
     "a 45 mm nodule series 345 in the right upper lobe ground-glass opacity . atelectasis left base ."),
    ("Heart size is enlarged.  Calcific plaques in the aorta.",
     "heart size is enlarged . calcific plaques in the aorta ."),
    ("1. Emphysema. 2. Bronchiectasis A=B <x> @y", "emphysema . bronchiectasis ab x y ."),
])
def test_cleaning_vectors_13_7(text, cleaned):
  assert ct_rate.clean_sentence_text(text) == cleaned
  assert tokenizer.clean_report_mimic_cxr(text) == cleaned  # without '"', R2Gen's cleaner agrees


@pytest.mark.parametrize("text,ours,r2gen", [
    # '"' deleted before the split: '." ' becomes a sentence end.
    ('Nodule." Next', "nodule . next .", "nodule next ."),
    # '"' deleted before the strip: the trailing '. "' no longer makes an empty last piece.
    ('Effusion. "', "effusion .", "effusion .  ."),
    ('"Calcific plaques."', "calcific plaques .", "calcific plaques ."),
    # Deleted after the space collapsing, as in R2Gen's pieces: the double space stays.
    ('a " b', "a  b .", "a  b ."),
])
def test_quote_deletion_before_strip_is_ct_agrgs_difference_from_r2gen(text, ours, r2gen):
  assert ct_rate.clean_sentence_text(text) == ours
  assert tokenizer.clean_report_mimic_cxr(text) == r2gen


def test_cleaning_keeps_empty_pieces_and_hyphens():
  assert ct_rate.clean_sentence_text("") == " ."
  assert ct_rate.clean_sentence_text("a.  . b") == "a .  . b ." == tokenizer.clean_report_mimic_cxr("a.  . b")
  assert ct_rate.clean_sentence_text("Peri-bronchial\nthickening #2 $3 ~x") == "peri-bronchial thickening #2 $3 ~x ."


# --- CSV tables ----------------------------------------------------------------------------------------------

def test_read_labels_first_row_wins_and_columns_by_name(tmp_path):
  header = ["Extra", *reversed(ABNORMALITIES), "VolumeName"]
  rows = [["x", *[1 if k == K - 1 - 3 else 0 for k in range(K)], "train_1_a_1.nii.gz"],  # Pericardial effusion
          ["y", *[1] * K, "train_1_a_1.nii.gz"],  # a repeated name: the first row wins
          ["z", *["1.0" if k == 0 else "0" for k in range(K)], "train_2_a_1.nii.gz"]]  # Interlobular, "1.0" = 1
  labels = ct_rate.read_labels(write_csv(tmp_path / "labels.csv", header, rows))
  assert list(labels) == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]
  assert labels["train_1_a_1.nii.gz"].dtype == np.float32 and labels["train_1_a_1.nii.gz"].shape == (K,)
  np.testing.assert_array_equal(labels["train_1_a_1.nii.gz"], np.eye(K, dtype=np.float32)[3])
  np.testing.assert_array_equal(labels["train_2_a_1.nii.gz"], np.eye(K, dtype=np.float32)[17])


def test_read_labels_errors_name_file_row_and_column(tmp_path):
  path = write_csv(tmp_path / "no_col.csv", ["VolumeName", *ABNORMALITIES[:7], *ABNORMALITIES[8:]],
                   [["train_1_a_1.nii.gz", *[0] * 17]])
  with pytest.raises(DataError, match=r"no_col\.csv lacks column\(s\) \['Emphysema'\]"):
    ct_rate.read_labels(path)
  rows = labels_rows({"train_1_a_1.nii.gz": set(), "train_2_a_1.nii.gz": set()})
  rows[1][1 + 9] = "2"
  with pytest.raises(DataError, match=r"row 3 of labels CSV .*bad\.csv \(train_2_a_1\.nii\.gz\): column "
                                      r"'Lung nodule' has '2'"):
    ct_rate.read_labels(write_csv(tmp_path / "bad.csv", ["VolumeName", *ABNORMALITIES], rows))
  rows[1][1 + 9] = ""
  with pytest.raises(DataError, match="'Lung nodule' has ''"):
    ct_rate.read_labels(write_csv(tmp_path / "empty.csv", ["VolumeName", *ABNORMALITIES], rows))
  rows[1][1 + 9] = "0"
  rows[1][0] = "train_2_a"
  with pytest.raises(DataError, match=r"row 3 .*volume name 'train_2_a'"):
    ct_rate.read_labels(write_csv(tmp_path / "name.csv", ["VolumeName", *ABNORMALITIES], rows))
  with pytest.raises(DataError, match="not found"):
    ct_rate.read_labels(tmp_path / "absent.csv")


def test_read_reports_and_metadata(tmp_path):
  reports = ct_rate.read_reports(write_csv(
      tmp_path / "reports.csv", ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                 "Impressions_EN"],
      [["train_1_a_1.nii.gz", "", "Non-contrast.", "Heart size is increased.\nNo effusion, \"none\".", ""],
       ["train_1_a_1.nii.gz", "x", "x", "other", "x"],
       ["train_2_a_1.nii.gz", " ", "t", "Normal."]]))  # a short row: Impressions_EN missing (pandas: NaN)
  assert reports["train_1_a_1.nii.gz"] == {"ClinicalInformation_EN": "", "Technique_EN": "Non-contrast.",
                                           "Findings_EN": "Heart size is increased.\nNo effusion, \"none\".",
                                           "Impressions_EN": ""}
  second = reports["train_2_a_1.nii.gz"]
  assert second["Impressions_EN"] == "" and second["ClinicalInformation_EN"] == "" and second["Findings_EN"] == "Normal."
  meta = ct_rate.read_metadata(write_csv(tmp_path / "meta.csv", ["VolumeName", "XYSpacing", "ZSpacing"],
                                         [["train_1_a_1.nii.gz", "[0.75, 0.75]", "1.5"]]))
  assert meta == {"train_1_a_1.nii.gz": {"XYSpacing": "[0.75, 0.75]", "ZSpacing": "1.5"}}
  with pytest.raises(DataError, match=r"lacks column\(s\) \['Findings_EN'\]"):
    ct_rate.read_reports(tmp_path / "meta.csv")


# --- §2.6 text slots -----------------------------------------------------------------------------------------

def test_text_slots(tmp_path):
  path = write_csv(tmp_path / "sentences.csv", ct_rate.SENTENCE_COLUMNS, [
      ["train_1_a_1.nii.gz", "Cardiomegaly", "Heart size is enlarged."],
      ["train_1_a_2.nii.gz", "Lung nodule", "A 4.5 mm nodule."],
      ["train_1_a_1.nii.gz", "Cardiomegaly", "Heart size is increased."],  # overwrites row 2
      ["train_9_a_1.nii.gz", "Emphysema", "Emphysema."],  # not in the labels CSV: slots, but never a sample
  ])
  rows = ct_rate.read_sentences(path)
  assert rows[0].where == f"row 2 of sentences CSV {path}" and rows[1].volume_name == "train_1_a_2.nii.gz"
  slots = ct_rate.text_slots(rows, ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_b_1.nii.gz"])
  assert set(slots) == {"train_1_a", "train_2_b", "train_9_a"}
  expected = [""] * K
  expected[2] = EOT + "heart size is increased ." + EOT
  expected[9] = EOT + "a 45 mm nodule ." + EOT
  assert slots["train_1_a"] == tuple(expected)
  assert slots["train_2_b"] == ("",) * K  # healthy
  assert slots["train_9_a"][7] == EOT + "emphysema ." + EOT


def test_unknown_abnormality_name_is_a_data_error_naming_row_and_value(tmp_path, capsys):
  path = write_csv(tmp_path / "sentences.csv", ct_rate.SENTENCE_COLUMNS, [
      ["train_1_a_1.nii.gz", "Cardiomegaly", "Heart size is increased."],
      ["train_1_a_1.nii.gz", "Tree in bud", "Tree-in-bud pattern."]])
  with pytest.raises(DataError, match=r"row 3 of sentences CSV .*sentences\.csv: AbnormalityName 'Tree in bud'"):
    ct_rate.text_slots(ct_rate.read_sentences(path), [])
  # As a CLI reports it: one error line.
  labels = write_labels(tmp_path / "labels.csv", {"train_1_a_1.nii.gz": {2}})
  (tmp_path / "vol").mkdir()
  assert cli.run_main(lambda: ct_rate.volume_records(tmp_path / "vol", labels, path)) == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: row 3 of sentences CSV") and "'Tree in bud'" in err[0]


def test_empty_sentence_text_is_refused(tmp_path):
  path = write_csv(tmp_path / "s.csv", ct_rate.SENTENCE_COLUMNS, [["train_1_a_1.nii.gz", "Cardiomegaly", " "]])
  with pytest.raises(DataError, match="row 2 .*Findings_EN is empty"):
    ct_rate.read_sentences(path)


def _touch(root: pathlib.Path, *relative: str) -> None:
  for r in relative:
    (root / r).parent.mkdir(parents=True, exist_ok=True)
    np.savez(root / r[:-len(".npz")], np.zeros((2, 2, 2), np.float32))


def test_volume_records_sorted_filtered_by_labels_with_slots(tmp_path):
  vol = tmp_path / "train"
  _touch(vol, "train_2/train_2_a/train_2_a_1.nii.gz.npz", "train_10/train_10_a/train_10_a_1.nii.gz.npz",
         "train_1/train_1_a/train_1_a_2.nii.gz.npz", "train_1/train_1_a/train_1_a_1.nii.gz.npz",
         "train_3/train_3_a/train_3_a_1.nii.gz.npz")  # train_3 is not in this split's labels: skipped
  labels = write_labels(tmp_path / "labels.csv", {"train_1_a_1.nii.gz": {2, 9}, "train_1_a_2.nii.gz": {2, 9},
                                                  "train_2_a_1.nii.gz": set(), "train_10_a_1.nii.gz": {12}})
  sentences = write_csv(tmp_path / "sentences.csv", ct_rate.SENTENCE_COLUMNS, [
      ["train_1_a_1.nii.gz", "Cardiomegaly", "Heart size is increased."],
      ["train_10_a_1.nii.gz", "Pleural effusion", "Bilateral pleural effusion."]])
  stage1 = ct_rate.volume_records(vol, labels)
  names = ["train_1_a_1.nii.gz.npz", "train_1_a_2.nii.gz.npz", "train_10_a_1.nii.gz.npz", "train_2_a_1.nii.gz.npz"]
  assert [r.name for r in stage1] == names  # sorted path order
  assert [r.path for r in stage1] == sorted(r.path for r in stage1) and os.path.isabs(stage1[0].path)
  assert all(r.texts is None for r in stage1)
  np.testing.assert_array_equal(stage1[2].labels, np.eye(K, dtype=np.float32)[12])
  stage2 = ct_rate.volume_records(vol, labels, sentences)
  assert [r.name for r in stage2] == names
  assert stage2[0].texts == stage2[1].texts and stage2[0].texts[2] == EOT + "heart size is increased ." + EOT
  assert stage2[0].texts[9] == ""  # label-positive without a sentence row: empty slot
  assert stage2[2].texts[12] == EOT + "bilateral pleural effusion ." + EOT
  assert stage2[3].texts == ("",) * K  # healthy accession


def test_volume_records_errors(tmp_path):
  labels = write_labels(tmp_path / "labels.csv", {"train_1_a_1.nii.gz": {2}})
  sentences = write_csv(tmp_path / "s.csv", ct_rate.SENTENCE_COLUMNS, [])
  with pytest.raises(DataError, match="Volume folder .* not found"):
    ct_rate.volume_records(tmp_path / "absent", labels)
  _touch(tmp_path / "ctclip", "train_1/train_1a/train_1_a_1.nii.gz.npz")  # CT-CLIP's accession folder name
  assert len(ct_rate.volume_records(tmp_path / "ctclip", labels)) == 1  # stage 1 does not use the folder name
  with pytest.raises(DataError, match=r"train_1_a_1\.nii\.gz\.npz lies in folder 'train_1a'.*'train_1_a'"):
    ct_rate.volume_records(tmp_path / "ctclip", labels, sentences)
  _touch(tmp_path / "odd", "train_1/train_1_a/train_1_a_1.npz")
  with pytest.raises(DataError, match=r"train_1_a_1\.npz.*volume name 'train_1_a_1'"):
    ct_rate.volume_records(tmp_path / "odd", labels)


# --- tokens --------------------------------------------------------------------------------------------------

CORPUS = ["heart size is increased .", "bilateral pleural effusion .", "calcific plaques in the aorta .",
          "a 45 mm nodule in the right upper lobe ground-glass opacity .", "minimal pericardial effusion ."] * 3


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> pathlib.Path:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=330, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  folder = tmp_path_factory.mktemp("gpt2")
  tok.model.save(str(folder))  # vocab.json + merges.txt, as GPT-2's files
  return folder


SLOT_TEXTS = ["Heart size is increased.", "Bilateral pleural effusion.", "Calcific plaques in the aorta.",
              "Unseen words: zygomatic xylophone qwerty.", "Ground-glass opacity; 4.5 mm nodule (series 3/45).",
              "Nodules " * 40]


def test_slot_encoding_matches_transformers_gpt2_tokenizer(gpt2_files):
  transformers = pytest.importorskip("transformers")
  ref = transformers.GPT2Tokenizer.from_pretrained(str(gpt2_files))
  tok = subword.load_tokenizer(gpt2_files)
  eot = tok.token_to_id(EOT)
  assert tok.family == "gpt2" and eot == ref.eos_token_id
  slots = [EOT + ct_rate.clean_sentence_text(t) + EOT for t in SLOT_TEXTS] + [""]
  truncated = 0
  for slot in slots:
    ids = ct_rate.encode_slot(tok, slot)
    assert ids == ref(slot, truncation=True, max_length=60)["input_ids"], slot
    if not slot:
      assert ids == []
      continue
    assert ids[0] == eot and len(ids) <= 60
    assert eot not in ids[1:-1]  # <|endoftext|> is one token, only at the ends
    if len(ids) == 60 and ids[-1] != eot:
      truncated += 1  # cut at the end: the final <|endoftext|> is lost
    else:
      assert ids[-1] == eot
    # No 'Ġ' before the first word: it is encoded like the text without a leading space.
    body = ct_rate.clean_sentence_text(SLOT_TEXTS[slots.index(slot)])
    assert ids[1:4] == tok.encode(body)[:3]
  assert truncated == 1
  assert ct_rate.encode_slot(tok, slots[0], max_length=4) == ref(slots[0], truncation=True, max_length=4)["input_ids"]
  with pytest.raises(ValueError, match="GPT-2"):
    ct_rate.encode_slot(tokenizer.Tokenizer(["a", "<unk>"], "mimic"), slots[0])


def test_collate_13_9():
  bos = eos = ct_rate.ENDOFTEXT_ID
  example0 = [[] for _ in range(K)]
  example0[2] = [bos, 11, 12, 13, 14, 15, eos]  # the longest slot: 7 tokens
  example0[12] = [bos, 21, eos]
  example1 = [[] for _ in range(K)]
  example1[0] = [bos, 31, 32, eos]
  targets, masks = ct_rate.collate_slots([example0, example1])
  assert targets.shape == masks.shape == (2, K, 7) and targets.dtype == np.int32 and masks.dtype == np.float32
  expected_t = np.full((2, K, 7), 50256, np.int32)
  expected_m = np.zeros((2, K, 7), np.float32)
  for b, example in enumerate((example0, example1)):
    for k, ids in enumerate(example):
      expected_t[b, k, :len(ids)] = ids
      expected_m[b, k, :len(ids)] = 1
  np.testing.assert_array_equal(targets, expected_t)
  np.testing.assert_array_equal(masks, expected_m)
  assert masks.sum() == 7 + 3 + 4 and np.all(targets[1, 5] == 50256) and np.all(masks[1, 5] == 0)
  # The mask alone tells EOS (mask 1) from padding (mask 0).
  assert targets[0, 12, 2] == targets[0, 12, 3] == 50256 and masks[0, 12, 2] == 1 and masks[0, 12, 3] == 0
  fixed_t, fixed_m = ct_rate.collate_slots([example0, example1], max_len=10)
  assert fixed_t.shape == (2, K, 10)
  np.testing.assert_array_equal(fixed_t[..., :7], targets)
  assert np.all(fixed_t[..., 7:] == 50256) and np.all(fixed_m[..., 7:] == 0)
  empty = [[[] for _ in range(K)]] * 3
  assert ct_rate.collate_slots(empty)[0].shape == (3, K, 0)
  assert ct_rate.collate_slots(empty, max_len=5)[1].shape == (3, K, 5)
  with pytest.raises(ValueError, match="more than max_len=6"):
    ct_rate.collate_slots([example0], max_len=6)
  with pytest.raises(ValueError, match="slots"):
    ct_rate.collate_slots([example0, example0[:17]])


def test_collate_of_encoded_slots(gpt2_files):
  tok = subword.load_tokenizer(gpt2_files)
  eot = tok.token_to_id(EOT)
  slots = [""] * K
  slots[2] = EOT + ct_rate.clean_sentence_text("Heart size is increased.") + EOT
  ids = [ct_rate.encode_slot(tok, s) for s in slots]
  targets, masks = ct_rate.collate_slots([ids], pad_id=eot)
  n = len(ids[2])
  assert targets.shape == (1, K, n) and masks[0, 2].sum() == n and masks.sum() == n
  assert targets[0, 2, 0] == targets[0, 2, n - 1] == eot


# --- reports -------------------------------------------------------------------------------------------------

def test_report_assembly_13_15(gpt2_files):
  tok = subword.load_tokenizer(gpt2_files)
  decoded = {k: ct_rate.decode_sentence(tok, ct_rate.encode_slot(tok, EOT + text + EOT))
             for k, text in ((12, "bilateral pleural effusion ."), (2, "heart size is increased ."))}
  assert decoded == {2: "heart size is increased.", 12: "bilateral pleural effusion."}
  assert ct_rate.assemble_report(decoded) == "heart size is increased. bilateral pleural effusion."
  assert ct_rate.assemble_report({}) == "No abnormalities detected."
  assert ct_rate.assemble_report({7: 'a "b".', 3: ""}) == " a b."  # an empty sentence keeps its space
  with pytest.raises(ValueError, match="outside"):
    ct_rate.assemble_report({18: "x"})
  rows = [""] * K
  rows[2], rows[12] = decoded[2], decoded[12]
  assert ct_rate.reference_report(rows) == "heart size is increased. bilateral pleural effusion."
  assert ct_rate.reference_report([""] * K) == ""
  padded = [tok.token_to_id(EOT)] * 5  # an empty target row decodes to ""
  assert ct_rate.decode_sentence(tok, padded) == ""


# --- thresholds ----------------------------------------------------------------------------------------------

def test_thresholds_round_trip(tmp_path):
  values = np.linspace(0.05, 0.9, K).astype(np.float32)
  path = ct_rate.write_thresholds(tmp_path / "thresholds.json", values)
  data = json.loads(path.read_text())
  assert list(data) == ["thresholds"] and list(data["thresholds"]) == list(ABNORMALITIES)
  read = ct_rate.read_thresholds(path)
  assert read.dtype == np.float32 and read.shape == (K,)
  np.testing.assert_array_equal(read, values)
  with pytest.raises(ValueError, match="18 numbers"):
    ct_rate.write_thresholds(tmp_path / "x.json", values[:17])


def _write_table(path: pathlib.Path, table) -> pathlib.Path:
  path.write_text(json.dumps({"thresholds": dict(table)}))
  return path


def test_thresholds_order_and_names_are_validated(tmp_path):
  items = [(n, 0.5) for n in ABNORMALITIES]
  swapped = items[:]
  swapped[3], swapped[4] = swapped[4], swapped[3]
  with pytest.raises(DataError, match="position 3 holds 'Coronary artery wall calcification', expected "
                                      "'Pericardial effusion'"):
    ct_rate.read_thresholds(_write_table(tmp_path / "order.json", swapped))
  with pytest.raises(DataError, match=r"missing name\(s\) \['Emphysema'\], unknown name\(s\) \['emphysema'\]"):
    ct_rate.read_thresholds(_write_table(tmp_path / "case.json",
                                         [("emphysema", 0.5) if n == "Emphysema" else (n, v) for n, v in items]))
  with pytest.raises(DataError, match=r"missing name\(s\) \['Bronchiectasis'\]"):
    ct_rate.read_thresholds(_write_table(tmp_path / "missing.json", [i for i in items if i[0] != "Bronchiectasis"]))
  with pytest.raises(DataError, match="'Cardiomegaly' has 1.5"):
    ct_rate.read_thresholds(_write_table(tmp_path / "range.json",
                                         [(n, 1.5 if n == "Cardiomegaly" else v) for n, v in items]))
  with pytest.raises(DataError, match="'Cardiomegaly' has True"):
    ct_rate.read_thresholds(_write_table(tmp_path / "bool.json",
                                         [(n, True if n == "Cardiomegaly" else v) for n, v in items]))
  text = json.dumps({"thresholds": dict(items)})
  (tmp_path / "dup.json").write_text(text[:-2] + ', "Consolidation": 0.1}}')
  with pytest.raises(DataError, match=r"\['Consolidation'\] appear more than once"):
    ct_rate.read_thresholds(tmp_path / "dup.json")
  (tmp_path / "flat.json").write_text(json.dumps(dict(items)))
  with pytest.raises(DataError, match="expected"):
    ct_rate.read_thresholds(tmp_path / "flat.json")


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
  tp = int(np.sum(pred & y))
  fp = int(np.sum(pred & ~y))
  fn = int(np.sum(~pred & y))
  return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def test_best_f1_thresholds_hand_example():
  probs = np.array([[0.1], [0.4], [0.35], [0.8]], np.float32)
  labels = np.array([[0], [0], [1], [1]])
  # Candidates 0.05, 0.225, 0.375, 0.6, 0.9 give F1 4/6, 4/5, 1/2, 2/3, 0.
  np.testing.assert_array_equal(ct_rate.best_f1_thresholds(probs, labels), np.float32([0.225]))


def test_best_f1_thresholds_against_brute_force():
  rng = np.random.default_rng(0)
  n = 80
  probs = rng.random((n, K)).astype(np.float32)
  probs[:, :6] = np.round(probs[:, :6], 1)  # ties
  probs[:3, 6] = [0.0, 1.0, 1.0]
  labels = (rng.random((n, K)) < rng.uniform(0.05, 0.9, K)).astype(np.int64)
  labels[:, 7] = 0  # no positives → 0.5
  labels[:, 8] = 0
  labels[:5, 8] = 1
  probs[:5, 8] = 0.0  # positives only at p = 0: no threshold in [0, 1) finds one → 0.5
  labels[:, 9] = 1  # all positive
  out = ct_rate.best_f1_thresholds(probs, labels)
  assert out.dtype == np.float32 and out.shape == (K,)
  assert out[7] == out[8] == 0.5
  for k in range(K):
    p, y = probs[:, k], labels[:, k] == 1
    values = np.unique(np.concatenate([p.astype(np.float64), [0.0, 1.0]]))
    best_f1, best_pred = -1.0, None
    for tau in (values[:-1] + values[1:]) / 2:  # every split, in increasing threshold order
      f1 = _f1(p > tau, y)
      if f1 > best_f1:
        best_f1, best_pred = f1, p > tau
    ours = p > out[k]  # the strict rule in float32
    if best_f1 == 0:
      assert out[k] == 0.5
      continue
    assert _f1(ours, y) == best_f1, k
    np.testing.assert_array_equal(ours, best_pred)  # the smallest maximising threshold
    for tau in np.linspace(0, 1, 401):  # no other threshold does better
      assert _f1(p > np.float32(tau), y) <= best_f1
  with pytest.raises(ValueError, match="probabilities"):
    ct_rate.best_f1_thresholds(probs + 1, labels)
  with pytest.raises(ValueError, match="equal shapes"):
    ct_rate.best_f1_thresholds(probs, labels[:, :17])


def test_best_f1_midpoint_never_rounds_onto_the_upper_value():
  lo = np.float32(0.3)
  hi = np.nextafter(lo, np.float32(1))  # adjacent float32 values: their midpoint is not representable
  probs = np.array([[lo], [hi]], np.float32)
  tau = ct_rate.best_f1_thresholds(probs, np.array([[0], [1]]))[0]
  np.testing.assert_array_equal(probs[:, 0] > tau, [False, True])
