"""loader: batch format, epochs, determinism across worker counts, checkpoint/resume, padded in-order eval,
per-process sharding, folder vs TFDS sources, to_global_batch; RadGen's weighted sampler, padded last train
batch, single-label class ids, cross-validation folds (R2Gen folder and CSV), configs saved before those keys."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from input_pipeline import loader, records, sampling
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


# --- RadGen data options (spec §2) ---------------------------------------------------------------------------

RADGEN_STEPS = 37  # ceil(147 / 4): the last train batch holds 3 records and 1 padding row


def _radgen_config():
  c = tiny_config(num_classes=3)
  d = c.data
  d.threshold = 2
  d.class_map = records.SAMPLE_CLASS_MAP
  d.label_mode = "single"
  d.weighted_sampler = True
  d.drop_last = False
  d.sample_weights = True
  d.augment = "radgen"
  return c


@pytest.fixture(scope="module")
def radgen_stream(tokenizer):
  """The first RADGEN_STEPS + 2 train batches of the RadGen options, seed 2."""
  return _take(iter(loader.train_dataset(_radgen_config(), tokenizer, seed=2)), RADGEN_STEPS + 2)


def test_weighted_sampler_epoch(radgen_stream):
  c = _radgen_config()
  assert loader.steps_per_epoch(c) == RADGEN_STEPS
  epoch = radgen_stream[:RADGEN_STEPS]
  b = epoch[0]
  assert set(b) == {"images", "targets", "masks", "labels", "sample_weight", "ids"}
  assert b["labels"].shape == (4,) and b["labels"].dtype == np.int32
  assert b["sample_weight"].shape == (4,) and b["sample_weight"].dtype == np.float32
  label_of = {r.id: r.label for r in loader.load_records(c, "train")}
  for batch in epoch[:-1]:
    np.testing.assert_array_equal(batch["sample_weight"], 1.0)
    np.testing.assert_array_equal(batch["labels"], [label_of[i] for i in batch["ids"]])
  last = epoch[-1]
  np.testing.assert_array_equal(last["sample_weight"], [1, 1, 1, 0])
  assert last["ids"][3] == "" and last["labels"][3] == 0 and (last["images"][3] == 0).all()
  drawn = [i for batch in epoch for i in batch["ids"] if i]
  assert len(drawn) == 147 and len(set(drawn)) < 147  # N draws with replacement
  # Balanced draws: each class ~ 1/3 of 147 (sd 0.039); natural frequencies 3 / 87 / 57 = 0.02 / 0.59 / 0.39.
  freq = np.bincount([label_of[i] for i in drawn], minlength=3) / 147
  np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.13)
  # The draw order is the sampler's: sampling.weighted_draws over ω of the train split, seed 2, epoch 0.
  train = loader.load_records(c, "train")
  order = sampling.weighted_draws(sampling.class_sampling_weights([r.label for r in train], 3), 2, 0)
  assert drawn == [train[i].id for i in order]


def test_weighted_sampler_resume_seed_and_workers(radgen_stream, tokenizer):
  c = _radgen_config()
  fresh = iter(loader.train_dataset(c, tokenizer, seed=2))
  fresh.set_state({"next_batch": RADGEN_STEPS - 2})  # mid-epoch, through the padded batch into epoch 1
  assert all(_same(a, b) for a, b in zip(radgen_stream[RADGEN_STEPS - 2:], _take(fresh, 4)))
  assert fresh.get_state() == {"next_batch": RADGEN_STEPS + 2}
  assert radgen_stream[RADGEN_STEPS]["ids"] != radgen_stream[0]["ids"]  # a new draw each epoch
  assert next(iter(loader.train_dataset(c, tokenizer, seed=3)))["ids"] != radgen_stream[0]["ids"]
  c.data.num_workers = 2
  it = iter(loader.train_dataset(c, tokenizer, seed=2))
  try:
    it.set_state({"next_batch": RADGEN_STEPS - 1})
    assert all(_same(a, b) for a, b in zip(radgen_stream[RADGEN_STEPS - 1:], _take(it, 2)))
  finally:
    it.close()


def test_single_label_eval_batches_and_option_errors(tokenizer):
  c = _radgen_config()
  batches = list(loader.eval_batches(c, tokenizer, "test"))
  label_of = {r.id: r.label for r in records.load_split("", "test", class_map=records.SAMPLE_CLASS_MAP)}
  valid = [(i, int(lab)) for b in batches for i, lab, v in zip(b["ids"], b["labels"], b["valid"]) if v]
  assert valid == list(label_of.items())
  np.testing.assert_array_equal(np.concatenate([b["sample_weight"] for b in batches]),
                                np.concatenate([b["valid"] for b in batches]))
  c.model.num_classes = 4
  with pytest.raises(ValueError, match="class_map of config.model.num_classes=4 classes; it has 3"):
    loader.load_records(c, "train")
  c.model.num_classes = 3
  c.data.sample_weights = False
  with pytest.raises(ValueError, match="drop_last=False .*sample_weights=True"):
    loader.steps_per_epoch(c)
  c.data.sample_weights = True
  c.data.source = "tfds"
  with pytest.raises(ValueError, match="source='folder'"):
    loader.raw_source(c, "train")
  c.data.source = "folder"
  c.data.label_mode = "soft"
  with pytest.raises(ValueError, match="label_mode='soft'"):
    loader.load_records(c, "train")
  plain = tiny_config(num_classes=15)
  plain.data.weighted_sampler = True
  with pytest.raises(records.DataError, match="weighted_sampler needs class ids.*class_map"):
    loader.train_dataset(plain, tokenizer, seed=0)


def test_sample_folds_by_patient():
  c = tiny_config(num_classes=15)  # multi-hot labels; the class map only stratifies the folds
  c.data.class_map = records.SAMPLE_CLASS_MAP
  c.data.fold, c.data.fold_seed, c.data.group_key = 4, 1, "id_prefix"
  train, val, test = (loader.load_records(c, s) for s in records.SPLITS)
  everything = [r for s in records.SPLITS for r in records.load_split("", s, class_map=records.SAMPLE_CLASS_MAP)]
  assert [r.id for r in val] == [r.id for r in test]
  assert sorted(r.id for r in train + val) == sorted(r.id for r in everything)
  patient = lambda r: r.id.split("_")[0]  # noqa: E731
  assert not {patient(r) for r in train} & {patient(r) for r in val}
  # §2.5 by hand: patients are the units, a patient's class is that of its first record by id; the classes'
  # units fill positions 0.. in class order and fold 4 takes positions p = 4 mod 5.
  first = {}
  for r in sorted(everything, key=lambda r: r.id):
    first.setdefault(patient(r), r.label)
  units = np.bincount(list(first.values()), minlength=3)
  starts = np.concatenate([[0], np.cumsum(units)])
  expected = [sum(p % 5 == 4 for p in range(starts[k], starts[k + 1])) for k in range(3)]
  assert np.bincount([first[p] for p in {patient(r) for r in val}], minlength=3).tolist() == expected
  assert val[0].labels.shape == (15,)
  c.data.fold = 5
  with pytest.raises(ValueError, match=r"config.data.fold=5 is not in 0..4"):
    loader.load_records(c, "train")


def test_csv_folds_through_the_loader(tmp_path, tokenizer):
  from test_records import make_csv_dataset

  cats = ("Normal", "Pneumonia", "TB")
  rows = [{"Image": f"x{i}.png", "Category": cats[i % 3], "fold": str(i % 5), "Impression": "Heart normal."}
          for i in range(15)]
  make_csv_dataset(tmp_path, rows)
  c = tiny_config(num_classes=3)
  c.data.data_dir, c.data.format, c.data.csv, c.data.label_mode, c.data.fold = str(tmp_path), "csv", "data.csv", \
      "single", 1
  assert [r.id for r in loader.load_records(c, "val")] == ["x1.png", "x6.png", "x11.png"]
  assert len(loader.load_records(c, "train")) == 12
  batch = next(loader.eval_batches(c, tokenizer, "val"))
  np.testing.assert_array_equal(batch["labels"][:3], [1, 0, 2])
  assert batch["labels"].dtype == np.int32 and batch["valid"].tolist() == [True, True, True, False]
  c.data.fold = -1
  with pytest.raises(ValueError, match="format='csv' has no splits of its own"):
    loader.load_records(c, "train")
  c.data.fold, c.data.csv = 1, ""
  with pytest.raises(ValueError, match="needs config.data.csv"):
    loader.load_records(c, "train")


def test_config_saved_before_the_new_keys_gives_the_same_batches(config, tokenizer):
  new_keys = ("hflip", "format", "csv", "image_dir", "class_map", "label_mode", "fold", "num_folds", "fold_seed",
              "group_key", "weighted_sampler", "drop_last", "sample_weights")
  saved = json.loads(config.to_json())
  for k in new_keys:
    del saved["data"][k]
  import ml_collections  # pylint: disable=g-import-not-at-top

  old = ml_collections.ConfigDict(saved)
  assert "label_mode" not in old.data
  assert all(_same(a, b) for a, b in zip(loader.eval_batches(config, tokenizer, "val"),
                                         loader.eval_batches(old, tokenizer, "val")))
  assert _same(next(iter(loader.train_dataset(config, tokenizer, seed=1))),
               next(iter(loader.train_dataset(old, tokenizer, seed=1))))
