"""rrg_jax.boxes: map → threshold → components → boxes (hand-computed), and the CLI on a CAMANet checkpoint: the
annotation copy it writes loads through the Align2Gen box validation, with the boxes of the checkpoint's own VDM."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import loader, records, transforms
from rrg_jax import boxes, checkpointing, models
from tests.conftest import random_init_variables, tiny_config
from tests.test_records import make_r2gen_folder


def test_boxes_from_map_hand_computed():
  heat = np.zeros((4, 4))
  heat[0, 0], heat[0, 1] = 0.9, 0.6          # component 1: row 0, cols 0-1, max 0.9
  heat[2:4, 3] = [0.7, 1.0]                  # component 2: rows 2-3, col 3, max 1.0
  heat[3, 0] = 0.4                           # below the threshold
  b, s = boxes.boxes_from_map(heat, threshold=0.5, width=200, height=100, max_boxes=3)
  assert b == [[150.0, 50.0, 50.0, 50.0], [0.0, 0.0, 100.0, 25.0], [-1.0, -1.0, -1.0, -1.0]]
  assert s == [1.0, 0.9, 0.0]
  b, s = boxes.boxes_from_map(heat, threshold=0.5, width=200, height=100, max_boxes=1)
  assert b == [[150.0, 50.0, 50.0, 50.0]] and s == [1.0]
  b, _ = boxes.boxes_from_map(np.zeros((2, 2)), threshold=0.5, width=8, height=8, max_boxes=2)
  assert b == [boxes.EMPTY] * 2


def test_cli_writes_valid_boxes_from_the_vdm(tmp_path, capsys):
  root = make_r2gen_folder(tmp_path / "data", {"train": 4, "val": 2, "test": 2}, num_classes=5,
                           image_size=(40, 48))
  config = tiny_config(num_classes=5)
  config.data.data_dir, config.data.threshold = str(root), 1
  tokenizer = loader.build_tokenizer(config)
  config.model.vocab_size = tokenizer.vocab_size
  variables = random_init_variables(config)
  s = config.data.image_size
  # a classifier bias that predicts every finding, so the VDM is not all zeros
  head = variables["params"]["visual_extractor"]["head"]
  head["bias"] = jnp.full_like(head["bias"], 5.0)
  ckpt = checkpointing.save_inference(tmp_path / "ckpt", config, variables, tokenizer)
  out = tmp_path / "ann.json"
  assert boxes.main(["--checkpoint", str(ckpt), "--out", str(out), "--max-boxes", "3", "--threshold", "0.6"]) == 0
  assert "boxes for 8 records" in capsys.readouterr().out
  provenance = json.loads((tmp_path / "ann.json.provenance.json").read_text())
  assert provenance["threshold"] == 0.6 and provenance["checkpoint"] == str(ckpt)
  (root / "annotation.json").write_text(out.read_text())
  recs = records.load_split(root, "val", num_classes=5, box_format="coco_xywh")
  system = models.get_system(checkpointing.load_inference(ckpt)[0])
  encode = jax.jit(lambda x: system.module.apply(variables, x, method="encode")["vdm"])
  for rec in recs:
    assert rec.boxes.width == 40 and rec.boxes.height == 48 and rec.boxes.valid.any()
    image = records.decode_image(records.read_bytes(rec.image_paths[0]), "t")
    x = transforms.transform_views([image], None, train=False, augment=config.data.augment,
                                   resize=int(config.data.resize), image_size=s)[None]
    vdm = np.asarray(encode(jnp.asarray(x))[0])
    side = int(round(np.sqrt(vdm.size)))
    want, _ = boxes.boxes_from_map(vdm.reshape(side, side), threshold=0.6, width=40, height=48, max_boxes=3)
    written = {r["id"]: r for r in json.loads(out.read_text())["val"]}
    assert written[rec.id]["boxes"] == want


def test_cli_bad_checkpoint_is_one_error_line(tmp_path, capsys):
  assert boxes.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o.json")]) == 2
  assert capsys.readouterr().err.startswith("error: ")
