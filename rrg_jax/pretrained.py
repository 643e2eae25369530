"""Local pretrained checkpoints → Flax modules and variables.

This module is where pretrained backbones are loaded from files already on disk: torchvision ``resnet*.pth``
now (HF folders later). Nothing is ever downloaded; a path must name an existing local file.
Reading goes through ``convert.load_state_dict`` (``torch.load(weights_only=True)``) and mapping through
``convert.state_dict_to_variables``, so a mismatch raises one ``convert.ConversionError`` listing every missing,
unexpected and mis-shaped key.
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
