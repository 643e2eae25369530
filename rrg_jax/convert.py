"""PyTorch checkpoints of the original systems / torchvision backbones → Flax variables.

CLI (an official checkpoint of any registered system → inference checkpoint)::

  python -m rrg_jax.convert --torch model_best.pth --config configs/camanet.py:iu_xray \
      --out checkpoints/camanet_iu [--annotation data/iu_xray/annotation.json]
  python -m rrg_jax.convert --torch model_best.pth --config configs/r2gen.py:iu_xray --out checkpoints/r2gen_iu
  python -m rrg_jax.convert --torch best_radgen_fold4.pth --config configs/radgen.py:radgen_code \
      --out checkpoints/radgen_code --config.data.report_tokenizer=BART_DIR --config.data.text_tokenizer=BERT_DIR
  python -m rrg_jax.convert --torch ct_agrg_stage2.pth --config configs/ct_agrg.py:inference \
      --out checkpoints/ct_agrg --config.data.report_tokenizer=GPT2_DIR   # also :pretrain / :stage1 checkpoints

``--config.KEY=VALUE`` overrides the config (as in train). The vocabulary: a subword tokenizer's
(``data.report_tokenizer``), else rebuilt from the annotation's train split (the R2Gen-family systems).

The system (``config.model.name``) says which key holds the vocabulary and how its original keys are renamed onto
the naming rule below (``System.torch_vocab_key`` / ``torch_key_renames``).

ImageNet initialisation for training: ``load_torchvision_backbone(path, variables, kind=...)`` copies a local
torchvision ``densenet121`` file (``densenet121-a639ec97.pth``, old ``norm.1`` or new ``norm1`` key spelling) or
``resnet*`` file into the ``visual_extractor/model`` backbone of an existing variables tree
(``config.model.pretrained_backbone`` names such a file).

Naming rule (Flax names mirror the torch keys): split the key on '.', merge every numeric component onto the one
before it with '_', join with '/'; the leaf ``weight`` becomes ``kernel`` (Linear: transposed; Conv: OIHW→HWIO),
``scale`` (BatchNorm) or ``embedding`` (Embedding) according to the expected tree (Conv1d: OIK→KIO, Conv3d:
OIDHW→DHWIO); ``running_mean``/``running_var`` go to ``batch_stats`` as ``mean``/``var``. The PE buffer,
``num_batches_tracked`` and the ``fore_back_learn.norm`` alias of ``fore_norm`` have no Flax counterpart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import pickle
import re
import sys
from typing import Any, Mapping

import numpy as np

SKIPPED_KEYS = (
    re.compile(r"(^|\.)num_batches_tracked$"),
    re.compile(r"(^|\.)tgt_embed\.1\.pe$"),
    re.compile(r"^fore_back_learn\.norm\.(gamma|beta)$"),
)
BACKBONE = ("visual_extractor", "model")
# torchvision's old DenseNet spelling `denselayer1.norm.1.weight` → `denselayer1.norm1.weight`.
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class ConversionError(ValueError):
  """A state_dict does not match the Flax model, or a file is not a readable PyTorch checkpoint."""


# --- reading .pth files ---------------------------------------------------------------------------------------

def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a ``.pth`` (bare state_dict, ``{'state_dict': ...}`` or ``{'model_state_dict': ...}``) safely into float
  numpy arrays.

  Uses ``torch.load(weights_only=True)``: pickles that would run code are refused. A ``module.`` prefix
  (DataParallel) is stripped.
  """
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"Reading {path} needs PyTorch: pip install 'rrg-jax[torch]' (torch is only "
                          "used to read .pth files).") from e
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file.")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    detail = next((line for line in str(e).splitlines() if "GLOBAL" in line), "")
    raise ConversionError(f"{path} was refused: it pickles objects other than tensors and plain containers "
                          f"(code could run on load), so it is not read. {detail}".strip()) from e
  except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
    first = str(e).splitlines()[0] if str(e) else ""
    raise ConversionError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                          f"{type(e).__name__}: {first}") from e
  for key in ("state_dict", "model_state_dict"):  # training-script wrappers (RadGen's: model_state_dict)
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not obj or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of names to "
                          "tensors, bare or under 'state_dict' / 'model_state_dict').")
  if all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


# --- mapping --------------------------------------------------------------------------------------------------

def flax_path(torch_key: str) -> tuple[tuple[str, ...], str]:
  """``a.layers.0.b.weight`` → (("a", "layers_0", "b"), "weight"): module path and torch leaf name."""
  *mods, leaf = torch_key.split(".")
  out: list[str] = []
  for m in mods:
    if m.isdigit() and out:
      out[-1] = f"{out[-1]}_{m}"
    else:
      out.append(m)
  return tuple(out), leaf


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _target(mods: tuple[str, ...], leaf: str, expected: Mapping[tuple[str, ...], Any]):
  """(flat expected path, transform) of one torch tensor; the path may be absent from ``expected``."""
  if leaf in ("running_mean", "running_var"):
    return ("batch_stats",) + mods + (leaf[len("running_"):],), None
  if leaf == "weight":
    for name in ("kernel", "scale", "embedding"):
      path = ("params",) + mods + (name,)
      if path in expected:
        return path, name
    return ("params",) + mods + ("kernel",), "kernel"
  return ("params",) + mods + (leaf,), None


def _transform(x: np.ndarray, kind: str | None) -> np.ndarray:
  if kind == "kernel" and x.ndim == 5:
    return x.transpose(2, 3, 4, 1, 0)  # Conv3d OIDHW → DHWIO
  if kind == "kernel" and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)  # OIHW → HWIO
  if kind == "kernel" and x.ndim == 3:
    return x.transpose(2, 1, 0)  # Conv1d OIK → KIO
  if kind == "kernel" and x.ndim == 2:
    return x.T
  return x


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                            source: str = "state_dict") -> dict[str, Any]:
  """Maps a torch state_dict onto the structure of ``expected`` ({"params", "batch_stats"} of arrays or
  ShapeDtypeStructs). Raises ONE ConversionError listing every missing, unexpected and mis-shaped key."""
  flat_expected = _flatten({k: expected[k] for k in ("params", "batch_stats") if k in expected})
  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, misshaped, misshaped_paths = [], [], set()
  for key, value in state_dict.items():
    if any(p.search(key) for p in SKIPPED_KEYS):
      continue
    mods, leaf = flax_path(key)
    path, kind = _target(mods, leaf, flat_expected)
    if path not in flat_expected:
      unexpected.append(f"{key} (→ {'/'.join(path)})")
      continue
    value = _transform(np.asarray(value), kind)
    want = tuple(flat_expected[path].shape)
    if value.shape != want:
      misshaped.append(f"{key} {tuple(np.shape(state_dict[key]))} → {'/'.join(path)} {value.shape}, "
                       f"expected {want}")
      misshaped_paths.add(path)
      continue
    out[path] = value.astype(flat_expected[path].dtype)
  missing = ["/".join(p) for p in flat_expected if p not in out and p not in misshaped_paths]
  if missing or unexpected or misshaped:
    lines = [f"{source} does not match the Flax model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {i}" for i in items)
    raise ConversionError("\n".join(lines))
  variables = _unflatten(out)
  return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}


def torchvision_to_backbone_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision ``densenet121`` keys (``features.*``, old or new spelling; ``classifier.*`` dropped) →
  backbone keys ``visual_extractor.model.*``."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith("classifier."):
      continue
    m = _OLD_DENSENET.match(key)
    if m:
      key = m.group(1) + m.group(2)
    if key.startswith("features."):
      key = key[len("features."):]
    out["visual_extractor.model." + key] = value
  return out


def _backbone_shapes(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The Flax backbone tree a DenseNet state_dict implies (4-D weight = conv kernel, 1-D weight = BN scale)."""
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in state_dict.items():
    if any(p.search(key) for p in SKIPPED_KEYS):
      continue
    mods, leaf = flax_path(key)
    shape = np.shape(value)
    if leaf == "weight":
      leaf, shape = ("kernel", (shape[2], shape[3], shape[1], shape[0])) if len(shape) == 4 else ("scale", shape)
    path, _ = _target(mods, leaf, {})
    flat[path] = np.broadcast_to(np.float32(0), shape)  # shape/dtype only, no memory
  return _unflatten(flat)


def _subtree(tree: Mapping[str, Any], at: tuple[str, ...]) -> Any:
  for k in at:
    tree = tree[k]
  return tree


def _replaced(tree: Mapping[str, Any], at: tuple[str, ...], value: Any) -> dict[str, Any]:
  """A copy of ``tree`` with the subtree at path ``at`` replaced by ``value``."""
  if not at:
    return value
  return {**tree, at[0]: _replaced(tree[at[0]], at[1:], value)}


def _into_backbone(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any], source: str,
                   at: tuple[str, ...] = BACKBONE) -> dict[str, Any]:
  """``variables`` with the backbone subtrees at path ``at`` (default ``visual_extractor/model``) replaced by
  ``state_dict`` (keys already ``visual_extractor.model.*``); the backbone configuration must match (refuses
  listing all differing keys)."""
  sub = {c: {BACKBONE[0]: {BACKBONE[1]: _subtree(variables[c], at)}} for c in ("params", "batch_stats")}
  loaded = state_dict_to_variables(state_dict, sub, source)
  new = dict(variables)
  for c in ("params", "batch_stats"):
    new[c] = _replaced(variables[c], at, loaded[c][BACKBONE[0]][BACKBONE[1]])
  return new


def load_torchvision_densenet(path: str | pathlib.Path, variables: Mapping[str, Any] | None = None
                              ) -> dict[str, Any]:
  """Local torchvision ImageNet DenseNet file → Flax backbone weights.

  With ``variables`` (a full model tree with a ``visual_extractor/model`` DenseNet): returns it with the backbone
  params and batch stats replaced; the backbone configuration must match the file (refuses listing all differing
  keys). Without: returns ``{"params": backbone, "batch_stats": backbone}`` (the ``visual_extractor/model``
  subtrees).
  """
  state_dict = torchvision_to_backbone_state_dict(load_state_dict(path))
  if variables is None:
    loaded = state_dict_to_variables(state_dict, _backbone_shapes(state_dict), str(path))
    return {c: loaded[c][BACKBONE[0]][BACKBONE[1]] for c in ("params", "batch_stats")}
  return _into_backbone(state_dict, variables, str(path))


BACKBONE_KINDS = ("densenet", "resnet")


def load_torchvision_backbone(path: str | pathlib.Path, variables: Mapping[str, Any], *, kind: str,
                              at: tuple[str, ...] = BACKBONE) -> dict[str, Any]:
  """``variables`` with its backbone at path ``at`` (default ``visual_extractor/model``) loaded from a local
  torchvision ImageNet file: ``kind`` "densenet" (``densenet121-*.pth``) or "resnet" (``resnet{18,34,50,101,152}
  -*.pth``; ``fc.*`` dropped). A missing file, or one whose backbone differs from the configured one, is a
  ``ConversionError``."""
  if kind not in BACKBONE_KINDS:
    raise ValueError(f"Unknown backbone kind {kind!r}; choose one of {BACKBONE_KINDS}.")
  if not pathlib.Path(path).is_file():
    raise ConversionError(f"config.model.pretrained_backbone={str(path)!r} does not exist.")
  if kind == "densenet":
    state_dict = torchvision_to_backbone_state_dict(load_state_dict(path))
  else:
    state_dict = {f"{'.'.join(BACKBONE)}.{k}": v for k, v in load_state_dict(path).items()
                  if not k.startswith("fc.")}
  return _into_backbone(state_dict, variables, str(path), at)


# --- the CLI --------------------------------------------------------------------------------------------------

def load_config(spec: str):
  """``path/to/config.py[:preset]`` → ConfigDict (the ml_collections config_flags convention)."""
  file, _, preset = spec.partition(":")
  path = pathlib.Path(file)
  if not path.is_file():
    raise ConversionError(f"Config file {path} not found.")
  module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def build_tokenizer(annotation: str | pathlib.Path, config):
  """The vocabulary of the official code: built from the annotation's train split (spec §2.2)."""
  from input_pipeline.tokenizer import Tokenizer

  path = pathlib.Path(annotation)
  try:
    train = json.loads(path.read_text())["train"]
    reports = [r["report"] for r in train]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{path} is not an R2Gen annotation.json with a 'train' list of records with "
                          f"'report': {e!r}") from e
  return Tokenizer.build(reports, threshold=config.data.threshold, clean=config.data.clean)


def convert(torch_path: str | pathlib.Path, config, out: str | pathlib.Path,
            annotation: str | pathlib.Path | None = None) -> pathlib.Path:
  """Official ``.pth`` of the system ``config.model.name`` → inference checkpoint at ``out`` (config.json +
  vocab.json + variables/)."""
  from rrg_jax import checkpointing, models

  config = config.copy_and_resolve_references()
  state_dict = load_state_dict(torch_path)
  system_class = models.system_class(config.model.name)
  vocab_size = system_class.torch_vocab_size(state_dict, str(torch_path))
  system_class.complete_config_from_torch(config, state_dict, str(torch_path))
  if config.data.get("report_tokenizer"):  # a subword tokenizer from local files (e.g. RadGen's BART BPE)
    from input_pipeline import subword  # pylint: disable=g-import-not-at-top

    tokenizer, where = subword.load_tokenizer(config.data.report_tokenizer), config.data.report_tokenizer
  else:
    if annotation is None:
      annotation = pathlib.Path(config.data.data_dir) / config.data.annotation
    if not pathlib.Path(annotation).is_file():
      raise ConversionError(f"Annotation {annotation} not found: the vocabulary is rebuilt from its train split; "
                            "pass --annotation PATH (or --config.data.report_tokenizer=DIR for a subword one).")
    tokenizer = build_tokenizer(annotation, config)
    where = f"the vocabulary built from {annotation} (threshold {config.data.threshold})"
  if vocab_size >= 0 and tokenizer.vocab_size != vocab_size:  # −1: a checkpoint without text (a CT-AGRG stage 0/1)
    raise ConversionError(f"{torch_path} has {vocab_size} output classes but {where} has {tokenizer.vocab_size}.")
  # A checkpoint without text (a CT-AGRG pre-training / stage-1 one) keeps the tokenizer's size, as training
  # writes it: the later stages and generate read the same vocabulary.
  config.model.vocab_size = vocab_size if vocab_size >= 0 else tokenizer.vocab_size
  variables = models.get_system(config).torch_to_variables(state_dict, str(torch_path))
  return checkpointing.save_inference(out, config, variables, tokenizer)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rrg_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch", required=True, help="the original code's checkpoint (model_best.pth)")
  parser.add_argument("--config", required=True, help="configs/<system>.py:PRESET (e.g. configs/camanet.py:iu_xray)")
  parser.add_argument("--out", required=True, help="output inference checkpoint directory")
  parser.add_argument("--annotation", default=None,
                      help="annotation.json whose train split defines the vocabulary "
                           "(default: config data_dir/annotation)")
  from rrg_jax import cli  # pylint: disable=g-import-not-at-top

  overrides, rest = cli.split_config_overrides(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(rest)

  def run():
    config = cli.apply_overrides(load_config(args.config), overrides)
    print(f"wrote {convert(args.torch, config, args.out, args.annotation)}")

  return cli.run_main(run)


if __name__ == "__main__":
  sys.exit(main())
