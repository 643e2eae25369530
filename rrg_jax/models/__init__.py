"""Model registry: ``get_model(config.model)`` builds the module registered under ``config.model.name``."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

_MODELS: dict[str, Any] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: registers a Module class with a ``from_config(model_config)`` classmethod under ``name``."""
  def wrap(cls: type) -> type:
    if name in _MODELS:
      raise ValueError(f"Model name {name!r} is registered twice ({_MODELS[name]} and {cls}).")
    _MODELS[name] = cls
    return cls
  return wrap


def get_model(model_config: Any) -> nn.Module:
  """The model named ``model_config.name``, configured from ``model_config``."""
  name = model_config.name
  if name not in _MODELS:
    raise ValueError(f"config.model.name={name!r} is not a registered model; known: {sorted(_MODELS)}.")
  return _MODELS[name].from_config(model_config)


from rrg_jax.models import camanet  # noqa: E402,F401  (registers "camanet")
