"""The loader's CT-RATE format (``input_pipeline.ct_examples`` through ``input_pipeline.loader``) on a small
SYNTHETIC set: batches of preprocessed volumes, labels and GPT-2 sentence slots exactly as the modules they come
from compute them (``volumes.preprocess``, ``ct_rate.volume_records`` / ``encode_slot`` / ``collate_slots``);
sorted file order, only the split's labelled files, padding rows of the last evaluation batch; stages without
sentences; the report tokenizer is the set's own; a half-configured sentences setup is refused."""

from __future__ import annotations

import numpy as np
import pytest

from configs import ct_agrg
from input_pipeline import ct_examples, ct_rate, loader, subword, synthetic_ct, volumes

SHAPE = (12, 48, 40)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return synthetic_ct.write_dataset(tmp_path_factory.mktemp("ct") / "set", num_train=5, num_val=2, num_test=3,
                                    shape=(12, 64, 64))


def config(root, stage: str = "stage2"):
  c = ct_agrg.get_config("tiny")
  c.data.data_dir = str(root)
  c.data.volume_shape = SHAPE
  c.data.report_tokenizer = str(root / ct_examples.TOKENIZER_DIR)
  c.data.splits = ct_agrg._splits(sentences=stage == "stage2")  # pylint: disable=protected-access
  c.train.batch_size = 2
  c.data.shuffle = False  # the code's sorted file order (the synthetic recipe shuffles)
  return c


def test_train_batches_are_the_modules_outputs(root):
  c = config(root)
  tokenizer = loader.build_tokenizer(c)
  assert isinstance(tokenizer, subword.SubwordTokenizer) and tokenizer.family == "gpt2"
  eot = tokenizer.token_to_id(ct_rate.ENDOFTEXT)
  paths = synthetic_ct.dataset_paths(root)["train"]
  records = ct_rate.volume_records(paths["volumes"], paths["labels"], paths["sentences"])
  assert [r.name for r in records] == sorted(r.name for r in records) and len(records) == 5
  assert loader.steps_per_epoch(c) == 2  # 5 volumes, batch 2, last partial batch dropped
  batch = next(iter(loader.train_dataset(c, tokenizer, seed=0)))
  assert batch["volumes"].shape == (2,) + SHAPE and batch["volumes"].dtype == np.float32
  for row, rec in enumerate(records[:2]):  # data.shuffle = False: file order
    np.testing.assert_array_equal(batch["volumes"][row], volumes.preprocess(volumes.load_contract_volume(rec.path),
                                                                            SHAPE))
    np.testing.assert_array_equal(batch["labels"][row], rec.labels)
    want_t, want_m = ct_rate.collate_slots([[ct_rate.encode_slot(tokenizer, t, 40) for t in rec.texts]], eot, 40)
    np.testing.assert_array_equal(batch["targets"][row], want_t[0])
    np.testing.assert_array_equal(batch["masks"][row], want_m[0])
    assert batch["targets"].shape == (2, 18, 40)
    positive = [k for k in range(18) if rec.texts[k]]
    assert positive and all(batch["masks"][row, k, 0] == 1 and batch["targets"][row, k, 0] == eot for k in positive)
  assert batch["ids"] == [r.name for r in records[:2]]


def test_eval_batches_pad_and_stages_without_sentences(root):
  c = config(root, stage="stage1")
  tokenizer = loader.build_tokenizer(c)
  batches = list(loader.eval_batches(c, tokenizer, "test"))
  assert len(batches) == 2 and set(batches[0]) == {"volumes", "labels", "valid", "ids"}
  assert batches[1]["valid"].tolist() == [True, False]
  np.testing.assert_array_equal(batches[1]["volumes"][1], np.full(SHAPE, volumes.AIR, np.float32))
  val = list(loader.eval_batches(c, tokenizer, "val"))
  assert sum(int(b["valid"].sum()) for b in val) == 2  # val's own labels CSV selects 2 volumes of the train folder

  half = config(root)
  half.data.splits.test.sentences = ""
  with pytest.raises(ValueError, match="sentences CSV for"):
    loader.eval_batches(half, tokenizer, "test")


def test_real_data_needs_its_tokenizer(root):
  c = config(root)
  c.data.report_tokenizer = ""
  with pytest.raises(ValueError, match="needs config.data.report_tokenizer"):
    loader.build_tokenizer(c)
