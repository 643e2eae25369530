"""loader: batch format, epochs, determinism across worker counts, checkpoint/resume, padded in-order eval,
per-process sharding, folder vs TFDS sources, to_global_batch."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from input_pipeline import loader, records
from input_pipeline.tokenizer import Tokenizer, VocabularyMismatchError

ARRAY_KEYS = ("images", "targets", "masks", "labels")


@pytest.fixture(scope="module")
def config():
  c = tiny_config(num_classes=15)  # the embedded sample: 147 / 21 / 51 records, 15 findings
  c.data.threshold = 2
  return c


@pytest.fixture(scope="module")
def tokenizer(config):
  return loader.build_tokenizer(config)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return a["ids"] == b["ids"] and all(np.array_equal(a[k], b[k]) for k in a if k != "ids")


def test_tokenizer_from_train_split(config, tokenizer, tmp_path):
  train = records.load_split("", "train", num_classes=15)
  assert tokenizer == Tokenizer.build([r.report for r in train], threshold=2, clean="mimic")
  tokenizer.save(tmp_path / "vocab.json")
  loader.check_tokenizer(config, Tokenizer.load(tmp_path / "vocab.json"), "checkpoint A")
  other = Tokenizer.build([r.report for r in train], threshold=3, clean="mimic")
  with pytest.raises(VocabularyMismatchError, match="checkpoint B: .*vocab_size"):
    loader.check_tokenizer(config, other, "checkpoint B")


def test_train_batch_format(config, tokenizer):
  assert loader.steps_per_epoch(config) == 147 // 4
  batch = next(iter(loader.train_dataset(config, tokenizer, seed=0)))
  assert set(batch) == {"images", "targets", "masks", "labels", "ids"}
  assert batch["images"].shape == (4, 1, 64, 64, 3) and batch["images"].dtype == np.float32
  assert batch["targets"].shape == (4, 60) and batch["targets"].dtype == np.int32
  assert batch["masks"].shape == (4, 60) and batch["masks"].dtype == np.float32
  assert batch["labels"].shape == (4, 15) and batch["labels"].dtype == np.float32
  by_id = {r.id: r for r in records.load_split("", "train", num_classes=15)}
  for row, rid in enumerate(batch["ids"]):
    ids = tokenizer.encode(by_id[rid].report)[:60]
    np.testing.assert_array_equal(batch["targets"][row], np.pad(ids, (0, 60 - len(ids))))
    np.testing.assert_array_equal(batch["masks"][row], np.arange(60) < len(ids))
    np.testing.assert_array_equal(batch["labels"][row], by_id[rid].labels)
  # ImageNet-normalised values of uint8 pixels.
  assert batch["images"].min() >= (0 - 0.485) / 0.229 - 1e-6 and batch["images"].max() <= (1 - 0.406) / 0.225


def test_truncation_keeps_bos_drops_eos(config, tokenizer):
  c = config.copy_and_resolve_references()
  c.data.max_seq_length = 5
  batch = next(iter(loader.train_dataset(c, tokenizer, seed=0)))
  assert batch["targets"].shape == (4, 5)
  assert (batch["targets"][:, 0] == 0).all() and (batch["targets"][:, 1:] != 0).all()  # long reports: no EOS
  assert (batch["masks"] == 1).all()


def test_epochs_shuffle_and_drop_last(config, tokenizer):
  steps = loader.steps_per_epoch(config)
  it = iter(loader.train_dataset(config, tokenizer, seed=3))
  epoch1 = [i for b in _take(it, steps) for i in b["ids"]]
  epoch2 = [i for b in _take(it, steps) for i in b["ids"]]
  all_ids = {r.id for r in records.load_split("", "train", num_classes=15)}
  for ep in (epoch1, epoch2):
    assert len(ep) == len(set(ep)) == steps * 4 and set(ep) <= all_ids
  assert epoch1 != epoch2
  first = next(iter(loader.train_dataset(config, tokenizer, seed=3)))
  other = next(iter(loader.train_dataset(config, tokenizer, seed=4)))
  assert first["ids"] == epoch1[:4] and other["ids"] != epoch1[:4]


def test_same_batches_with_two_workers_and_resume(config, tokenizer):
  it0 = iter(loader.train_dataset(config, tokenizer, seed=5))
  ref = _take(it0, 3)
  state0 = json.loads(json.dumps(it0.get_state()))  # what grain.checkpoint writes
  ref += _take(it0, 2)
  c = config.copy_and_resolve_references()
  c.data.num_workers = 2
  it = iter(loader.train_dataset(c, tokenizer, seed=5))
  try:
    got = _take(it, 3)
    state = it.get_state()
    got += _take(it, 2)
  finally:
    it.close()
  assert state == state0 == {"next_batch": 3}
  assert all(_same(a, b) for a, b in zip(ref, got))
  resumed = iter(loader.train_dataset(c, tokenizer, seed=5))  # 0-worker state, resumed with 2 workers
  try:
    resumed.set_state(state0)
    assert all(_same(a, b) for a, b in zip(ref[3:], _take(resumed, 2)))
  finally:
    resumed.close()
  with pytest.raises(ValueError):
    next(resumed)


def test_resume_across_epoch_boundary(config, tokenizer):
  steps = loader.steps_per_epoch(config)
  it = iter(loader.train_dataset(config, tokenizer, seed=6))
  _take(it, steps - 1)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = iter(loader.train_dataset(config, tokenizer, seed=6))
  fresh.set_state(state)
  assert all(_same(a, b) for a, b in zip(expected, _take(fresh, 3)))


def test_eval_in_order_padded(config, tokenizer):
  batches = list(loader.eval_batches(config, tokenizer, "val"))
  assert len(batches) == 6  # ceil(21 / 4)
  ids = [i for b in batches for i, v in zip(b["ids"], b["valid"]) if v]
  assert ids == [r.id for r in records.load_split("", "val", num_classes=15)]
  last = batches[-1]
  np.testing.assert_array_equal(last["valid"], [True, False, False, False])
  assert last["ids"][1:] == ["", "", ""] and (last["images"][1:] == 0).all() and (last["masks"][1:] == 0).all()
  assert all(b["images"].shape == (4, 1, 64, 64, 3) and b["valid"].dtype == np.bool_ for b in batches)
  again = list(loader.eval_batches(config, tokenizer, "val"))
  assert all(_same(a, b) for a, b in zip(batches, again))
  c = config.copy_and_resolve_references()
  c.train.max_eval_examples = 5
  few = list(loader.eval_batches(c, tokenizer, "val"))
  assert len(few) == 2 and sum(b["valid"].sum() for b in few) == 5


def test_process_shards_concatenate_to_the_global_batch(config, tokenizer, monkeypatch):
  c = config.copy_and_resolve_references()
  c.train.batch_size = 8
  train_ref = _take(iter(loader.train_dataset(c, tokenizer, seed=7)), 2)
  eval_ref = list(loader.eval_batches(c, tokenizer, "val"))
  parts_train, parts_eval = [], []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for pi in range(2):
    monkeypatch.setattr(jax, "process_index", lambda pi=pi: pi)
    parts_train.append(_take(iter(loader.train_dataset(c, tokenizer, seed=7)), 2))
    parts_eval.append(list(loader.eval_batches(c, tokenizer, "val")))
  for b in range(2):
    assert parts_train[0][b]["images"].shape[0] == 4
    assert parts_train[0][b]["ids"] + parts_train[1][b]["ids"] == train_ref[b]["ids"]
    np.testing.assert_array_equal(np.concatenate([parts_train[0][b]["images"], parts_train[1][b]["images"]]),
                                  train_ref[b]["images"])
  assert len(parts_eval[0]) == len(parts_eval[1]) == len(eval_ref) == 3
  for b, ref in enumerate(eval_ref):
    assert parts_eval[0][b]["ids"] + parts_eval[1][b]["ids"] == ref["ids"]
    np.testing.assert_array_equal(np.concatenate([parts_eval[0][b]["valid"], parts_eval[1][b]["valid"]]),
                                  ref["valid"])


def test_to_global_batch(config, tokenizer):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  batch = next(loader.eval_batches(config, tokenizer, "test"))
  out = loader.to_global_batch(batch, mesh)
  assert set(out) == {"images", "targets", "masks", "labels", "valid"}
  for k, v in out.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape and v.sharding.spec == P("data")
    assert len(v.addressable_shards) == 4 and v.addressable_shards[1].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(v), batch[k])


def test_folder_and_tfds_sources_give_identical_examples(config, tokenizer, tmp_path):
  c = config.copy_and_resolve_references()
  c.data.source = "tfds"
  c.data.tfds_dir = str(tmp_path / "tfds")
  assert loader.build_tokenizer(c) == tokenizer
  assert loader.steps_per_epoch(c) == loader.steps_per_epoch(config)
  folder = loader.raw_source(config, "test")
  tf_src = loader.raw_source(c, "test")
  assert len(folder) == len(tf_src) == 51
  for i in (0, 17, 50):
    a, b = folder[i], tf_src[i]
    assert a["id"] == b["id"] and a["report"] == b["report"] and a["images"] == b["images"]
    np.testing.assert_array_equal(a["labels"], b["labels"])
  assert all(_same(a, b) for a, b in zip(loader.eval_batches(config, tokenizer, "val"),
                                         loader.eval_batches(c, tokenizer, "val")))
  assert all(_same(a, b) for a, b in zip(_take(iter(loader.train_dataset(config, tokenizer, seed=1)), 3),
                                         _take(iter(loader.train_dataset(c, tokenizer, seed=1)), 3)))


def test_bad_records_skip_and_errors(tmp_path, tokenizer):
  from test_records import make_r2gen_folder

  root = make_r2gen_folder(tmp_path, {"train": 9, "val": 2, "test": 2}, views=2, iu_ids=True, mode="I;16")
  (root / "images" / "CXR3_IM-0003-0001" / "1.png").unlink()
  c = tiny_config(num_views=2, num_classes=3)
  c.data.data_dir, c.data.label_key, c.data.clean, c.data.threshold = str(root), "iu", "iu", 1
  with pytest.raises(records.DataError, match="CXR3_IM-0003-0001"):
    loader.build_tokenizer(c)
  c.data.on_bad_record = "skip"
  tok = loader.build_tokenizer(c)
  assert loader.steps_per_epoch(c) == 2  # 8 usable records
  batch = next(iter(loader.train_dataset(c, tok, seed=0)))
  assert batch["images"].shape == (4, 2, 64, 64, 3) and "CXR3_IM-0003-0001" not in batch["ids"]
  c.model.num_classes = 4
  with pytest.raises(records.DataError, match="3 values, expected 4|classes"):
    loader.build_tokenizer(c)
  c.model.num_classes = 3
  c.data.source = "parquet"
  with pytest.raises(ValueError, match="config.data.source"):
    loader.build_tokenizer(c)
  c.data.source = "folder"
  c.train.batch_size = 16
  with pytest.raises(ValueError, match="fewer than config.train.batch_size"):
    loader.steps_per_epoch(c)


def test_orbax_grain_checkpoint_round_trip(config, tokenizer, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  it = iter(loader.train_dataset(config, tokenizer, seed=8))
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
    m.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    m.wait_until_finished()
    expected = next(it)
    fresh = iter(loader.train_dataset(config, tokenizer, seed=8))
    m.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _same(next(fresh), expected)
