"""Local pretrained checkpoints → Flax modules and variables.

This module is where pretrained backbones are loaded from files already on disk. Nothing is ever downloaded; a
path must name an existing local file or folder. One entry point for every kind::

    module, variables = pretrained.load("resnet50", "resnet50-0676ba61.pth")   # torchvision .pth
    module, variables = pretrained.load("bert", "/models/Bio_ClinicalBERT")      # local HF folders …
    module, variables = pretrained.load("gpt2", "/models/gpt2", pseudo_self_attention=True)

``load(kind, path, **options)`` dispatches on ``kind`` (``KINDS``):
  * ``resnet18`` … ``resnet152``: ``load_resnet`` here; the depth named by the kind must be the file's (read from
    its keys), else ``convert.ConversionError``; option ``widths``.
  * ``bert``, ``gpt2``, ``swin``, ``bart``: ``rrg_jax.hf_weights.load_<kind>(folder, **options)``; options are the
    loader's keyword arguments (checked against its signature).
An unknown kind is a ValueError listing the kinds.

ResNet reading goes through ``convert.load_state_dict`` (``torch.load(weights_only=True)``) and mapping through
``convert.state_dict_to_variables``, so a mismatch raises one ``convert.ConversionError`` listing every missing,
unexpected and mis-shaped key; the HF loaders behave the same way (see ``rrg_jax.hf_weights``).
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rrg_jax import convert
from rrg_jax.layers.resnet import RESNET_LAYERS, ResNet, is_bottleneck

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
_CONV3_KEY = re.compile(r"^layer[1-4]\.\d+\.conv3\.weight$")


def infer_resnet_depth(state_dict: Mapping[str, Any], source: str = "state_dict") -> int:
  """The torchvision ResNet depth whose blocks per layer and block type (``conv3`` present = Bottleneck) match
  ``state_dict``'s keys; ConversionError when none does."""
  blocks: dict[int, set[int]] = {l: set() for l in range(1, 5)}
  for key in state_dict:
    m = _BLOCK_KEY.match(key)
    if m:
      blocks[int(m.group(1))].add(int(m.group(2)))
  counts = tuple(len(blocks[l]) for l in range(1, 5))
  bottleneck = any(_CONV3_KEY.match(k) for k in state_dict)
  for depth, layers in RESNET_LAYERS.items():
    if layers == counts and is_bottleneck(depth) == bottleneck:
      return depth
  raise convert.ConversionError(
      f"{source} matches no torchvision ResNet depth: blocks per layer1..4 = {counts}, "
      f"{'Bottleneck' if bottleneck else 'BasicBlock'} blocks (conv3 {'present' if bottleneck else 'absent'}); "
      f"known: " + ", ".join(f"{d}: {l} {'Bottleneck' if is_bottleneck(d) else 'BasicBlock'}"
                             for d, l in RESNET_LAYERS.items()) + ".")


def _infer_widths(state_dict: Mapping[str, np.ndarray]) -> tuple[int, ...] | None:
  """Each stage's planes = the output channels of its first block's conv1 (None if a key is absent)."""
  try:
    return tuple(int(np.shape(state_dict[f"layer{l}.0.conv1.weight"])[0]) for l in range(1, 5))
  except KeyError:
    return None


def load_resnet(path: str | pathlib.Path, depth: int | None = None, widths: Sequence[int] | None = None
                ) -> tuple[ResNet, dict[str, Any]]:
  """Local torchvision ``resnet{18,34,50,101,152}*.pth`` (a bare state_dict; ``fc.*`` dropped) →
  (``ResNet(depth, widths)``, ``{"params", "batch_stats"}`` of float32 numpy arrays).

  ``depth`` None: inferred from the keys (blocks per layer, ``conv3`` or not). ``widths`` None: read from the
  stages' first conv1 (torchvision's default for the published files). Raises ``convert.ConversionError`` for an
  unreadable file, a state_dict matching no depth, or (one error listing all of them) missing, unexpected or
  mis-shaped keys.
  """
  state_dict = {k: v for k, v in convert.load_state_dict(path).items() if not k.startswith("fc.")}
  if depth is None:
    depth = infer_resnet_depth(state_dict, str(path))
  if widths is None:
    widths = _infer_widths(state_dict) or (64, 128, 256, 512)
  model = ResNet(depth=depth, widths=tuple(widths))
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, False), images)
  return model, convert.state_dict_to_variables(state_dict, expected, str(path))


# --- one entry point for every kind ---------------------------------------------------------------------------

RESNET_KINDS = tuple(f"resnet{d}" for d in sorted(RESNET_LAYERS))
# kind → the function of rrg_jax.hf_weights that reads a local HF folder of that model.
HF_LOADERS = {"bert": "load_bert", "gpt2": "load_gpt2", "swin": "load_swin", "bart": "load_bart"}
KINDS = RESNET_KINDS + tuple(HF_LOADERS)


def _check_options(fn: Any, options: Mapping[str, Any], kind: str, fixed: Sequence[str] = ()) -> None:
  import inspect

  for name in fixed:
    if name in options:
      raise TypeError(f"pretrained.load({kind!r}): {name!r} is given by the kind, not an option.")
  params = inspect.signature(fn).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  accepted = [n for i, (n, p) in enumerate(params.items()) if i > 0 and n not in fixed
              and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise TypeError(f"pretrained.load({kind!r}): unknown option(s) {unknown}; "
                    f"{getattr(fn, '__module__', '')}.{fn.__name__} accepts {accepted or 'none'}.")


def load(kind: str, path: str | pathlib.Path, **options: Any) -> tuple[Any, dict[str, Any]]:
  """``(module, variables)`` of a local pretrained checkpoint of ``kind`` (see the module docstring)."""
  if not isinstance(kind, str) or kind.strip().lower() not in KINDS:
    raise ValueError(f"Unknown pretrained kind {kind!r}; choose one of: {', '.join(KINDS)}.")
  kind = kind.strip().lower()
  if kind in RESNET_KINDS:
    depth = int(kind[len("resnet"):])
    _check_options(load_resnet, options, kind, fixed=("depth",))
    module, variables = load_resnet(path, depth=None, **options)
    if module.depth != depth:
      raise convert.ConversionError(
          f"{path} holds a ResNet-{module.depth} ({RESNET_LAYERS[module.depth]} "
          f"{'Bottleneck' if is_bottleneck(module.depth) else 'BasicBlock'} blocks), not the ResNet-{depth} that "
          f"kind {kind!r} asks for; use kind 'resnet{module.depth}' or the right file.")
    return module, variables
  from rrg_jax import hf_weights  # pylint: disable=g-import-not-at-top

  fn = getattr(hf_weights, HF_LOADERS[kind])
  _check_options(fn, options, kind)
  return fn(path, **options)
