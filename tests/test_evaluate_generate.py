"""rrg_jax.evaluate and rrg_jax.generate end to end on a tiny random CAMANet saved as an inference checkpoint
(embedded sample data, 15 findings), plus the evaluation library on hand-made batches."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_init_variables, tiny_config
from input_pipeline import loader
from rrg_jax import checkpointing, evaluate, models
from rrg_jax.metrics import clinical, text

SAMPLE_IMAGES = pathlib.Path(loader.records.resolve_data_dir("")) / "images"


@pytest.fixture(autouse=True)
def no_meteor(monkeypatch):
  """METEOR (a JVM start per call) is tested in test_metrics.py."""
  from rrg_jax.metrics import text

  monkeypatch.setattr(text, "java_available", lambda: False)
  monkeypatch.setattr(text, "_warned_no_java", True)


def _config(num_views: int = 1):
  c = tiny_config(num_views=num_views, num_classes=15)
  c.data.max_seq_length = 10
  c.train.batch_size = 4
  c.train.max_eval_examples = 6  # two batches, the second half padding
  return c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
  config = _config()
  tokenizer = loader.build_tokenizer(config)
  config.model.vocab_size = tokenizer.vocab_size
  variables = random_init_variables(config)
  return checkpointing.save_inference(tmp_path_factory.mktemp("ckpt") / "model", config, variables, tokenizer)


def test_evaluate_cli_writes_metrics_and_reports(checkpoint, tmp_path, capsys):
  out = tmp_path / "eval"
  assert evaluate.main(["--checkpoint", str(checkpoint), "--split", "val", "--workdir", str(out),
                        "--no-progress", "--config.decode.cached=false"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["split"] == "val" and metrics["num_reports"] == 6
  assert {"BLEU_1", "BLEU_4", "ROUGE_L", "Cider", "sacreBLEU"} <= set(metrics)
  assert not any(k.startswith("CE_") for k in metrics)  # 15 sample findings: not CheXpert
  rows = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
  val_ids = [r.id for r in loader.load_records(_config(), "val")[:6]]
  assert [r["id"] for r in rows] == val_ids  # every record once, in order, padding rows dropped
  classes = json.loads((SAMPLE_IMAGES.parent / "labels.json").read_text())["classes"]
  for r in rows:
    assert set(r) == {"id", "reference", "generated", "probabilities", "predicted_findings"}
    assert list(r["probabilities"]) == classes
    assert r["predicted_findings"] == [c for c, p in r["probabilities"].items() if p >= 0.5]
    assert isinstance(r["generated"], str) and r["reference"]
  assert "BLEU_4" in capsys.readouterr().out


def test_evaluate_cli_user_errors(tmp_path, capsys, checkpoint):
  assert evaluate.main(["--checkpoint", str(tmp_path / "missing")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert evaluate.main(["--checkpoint", str(checkpoint), "--config.decode.cahced=false"]) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'decode.cahced'" in err and 'did you mean "cached"' in err
  assert "Traceback" not in err


@pytest.mark.slow
def test_evaluate_split_scores_every_valid_record_once(checkpoint):
  """Hand-made batches: padding rows are skipped, references are decode(targets[:, 1:]), and the scores equal
  the configured evaluators on the collected texts (CE_* from the labeler, CLS_* from probs vs labels)."""
  config, variables, tokenizer = checkpointing.load_inference(checkpoint)
  config.model.num_classes = 14
  config.eval.evaluators = ("report_text", "clinical_efficacy", "multilabel_classification")
  system = models.get_system(config)
  model = system.module
  s = config.data.image_size
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((1, 1, s, s, 3)),
      jnp.zeros((1, 10), jnp.int32), jnp.ones((1, 10)))
  rng = np.random.default_rng(0)
  texts = ["heart size is normal .", "small left pleural effusion .", "no pneumothorax .", "mild cardiomegaly ."]
  batches = []
  for b in range(2):
    targets = np.zeros((4, 10), np.int32)
    for i in range(4):
      ids = tokenizer.encode(texts[(b + i) % 4])[:10]
      targets[i, :len(ids)] = ids
    batches.append({"images": rng.normal(size=(4, 1, s, s, 3)).astype(np.float32), "targets": targets,
                    "masks": (targets > 0).astype(np.float32), "labels": np.eye(4, 14, dtype=np.float32),
                    "valid": np.array([True, True, True, b == 0]), "ids": [f"r{b}{i}" for i in range(4)]})
  scores, reports = evaluate.evaluate_split(system, variables, tokenizer, batches, progress=False)
  assert [r["id"] for r in reports] == ["r00", "r01", "r02", "r03", "r10", "r11", "r12"]
  assert [r["reference"] for r in reports] == [tokenizer.decode(tokenizer.encode(t)[1:]) for t in
                                               texts + texts[1:]]
  refs, gens = [r["reference"] for r in reports], [r["generated"] for r in reports]
  probs = np.asarray([r["probabilities"] for r in reports])
  want = text.compute_scores(dict(enumerate(refs)), dict(enumerate(gens)))
  want.update(clinical.clinical_efficacy(gens, refs))
  cls = clinical.precision_recall_f1(probs >= 0.5, np.concatenate([np.eye(4, 14)[:4], np.eye(4, 14)[:3]]) >= 0.5)
  want.update({k.replace("CE_", "CLS_"): v for k, v in cls.items()})
  assert scores == pytest.approx(want)
  assert {"CE_F1_micro", "CE_F1_macro", "CLS_F1_micro", "CLS_precision_macro"} <= set(scores)


def test_class_names():
  c = _config()
  assert evaluate.class_names(c)[:2] == json.loads((SAMPLE_IMAGES.parent / "labels.json").read_text())["classes"][:2]
  c.model.num_classes = 14
  assert evaluate.class_names(c)[8] == "No Finding"
  c.model.num_classes = 3
  assert evaluate.class_names(c) == ["class_0", "class_1", "class_2"]


# --- generate -------------------------------------------------------------------------------------------------

def _sample_image(i: int = 0) -> str:
  return str(sorted(SAMPLE_IMAGES.glob("*/0.jpg"))[i])


def test_generate_cli_json_and_heatmaps(checkpoint, tmp_path, capsys):
  from rrg_jax import generate

  out = tmp_path / "gen"
  assert generate.main(["--checkpoint", str(checkpoint), "--image", _sample_image(), "--out", str(out), "--json",
                        "--words", "2"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert set(result) == {"report", "log_prob", "findings", "predicted_findings", "heatmap_words", "heatmaps"}
  classes = json.loads((SAMPLE_IMAGES.parent / "labels.json").read_text())["classes"]
  assert sorted(result["findings"]) == sorted(classes)
  assert result["predicted_findings"] == [c for c in classes if result["findings"][c] >= 0.5]
  assert len(result["heatmap_words"]) <= 2
  for kind, path in result["heatmaps"].items():
    assert pathlib.Path(path).parent == out and path.endswith(".png")
    assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "vdm" in result["heatmaps"]
  # plain-text output names the report and findings
  assert generate.main(["--checkpoint", str(checkpoint), "--image", _sample_image(), "--out", str(out)]) == 0
  text_out = capsys.readouterr().out
  assert "Report:" in text_out and classes[0] in text_out


@pytest.mark.parametrize("case", ["missing_checkpoint", "missing_image", "bad_image", "two_images"])
def test_generate_cli_user_errors(checkpoint, tmp_path, capsys, case):
  from rrg_jax import generate

  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  argv = {"missing_checkpoint": ["--checkpoint", str(tmp_path / "nope"), "--image", _sample_image()],
          "missing_image": ["--checkpoint", str(checkpoint), "--image", str(tmp_path / "x.png")],
          "bad_image": ["--checkpoint", str(checkpoint), "--image", str(bad)],
          "two_images": ["--checkpoint", str(checkpoint), "--image", _sample_image(0), "--image", _sample_image(1)],
          }[case]
  assert generate.main(argv + ["--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  want = {"missing_checkpoint": "does not exist", "missing_image": "not found", "bad_image": "Cannot decode",
          "two_images": "1 view(s) per study"}[case]
  assert want in err and "Traceback" not in err


def test_top_words_ranks_by_similarity_to_the_vdm():
  from rrg_jax import heatmaps

  words = ["left", ".", "effusion", "heart"]
  vdm = np.array([1.0, 0.0, 0.0, 0.0])
  attention = np.array([[0.1, 0.9, 0, 0], [1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.5, 0.5, 0, 0]])
  assert heatmaps.top_words(words, attention, vdm, 2) == [2, 3]  # "." skipped, report order
  grids = heatmaps.view_grids(np.arange(8), 2)
  np.testing.assert_array_equal(grids[1], [[4, 5], [6, 7]])
  with pytest.raises(ValueError, match="square grid"):
    heatmaps.view_grids(np.arange(6), 2)


def test_inference_checkpoint_saved_on_four_devices_loads_in_a_one_device_process(tmp_path):
  """``rrg_jax.train`` runs every CPU core as a device; ``evaluate`` / ``generate`` run on JAX's default (one):
  variables saved replicated over 4 devices must load there, as host arrays equal to what was saved."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from input_pipeline.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from rrg_jax import sharding  # pylint: disable=g-import-not-at-top

  config = _config()
  config.model.vocab_size = 5
  mesh = sharding.create_mesh((4,))
  variables = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "batch_stats": {"mean": jnp.ones((3,))}}
  variables = jax.device_put(variables, sharding.replicated(mesh))
  tokenizer = Tokenizer(("<unk>", "a", "b", "c"), clean="mimic")
  checkpointing.save_inference(tmp_path / "ckpt", config, variables, tokenizer)
  code = ("import jax, numpy as np; from rrg_jax import checkpointing; "
          f"_, v, _ = checkpointing.load_inference({str(tmp_path / 'ckpt')!r}); "
          "assert len(jax.devices()) == 1; print(np.asarray(v['params']['w']).tolist(), "
          "np.asarray(v['batch_stats']['mean']).tolist())")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split("\n")[0] == "[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] [1.0, 1.0, 1.0]"
