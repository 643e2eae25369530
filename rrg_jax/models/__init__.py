"""System registry: ``get_system(config)`` builds the system registered under ``config.model.name``.

Each system is a ``models.system.System`` subclass in ``rrg_jax/models/<name>.py`` with its config file
``configs/<name>.py``; ``python -m rrg_jax.models`` lists them with their presets.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from rrg_jax.models.system import System

_SYSTEMS: dict[str, type[System]] = {}


class UnknownSystemError(ValueError):
  """``config.model.name`` names no registered system."""


def register(name: str) -> Callable[[type[System]], type[System]]:
  """Class decorator: registers a ``System`` subclass under ``name`` (= ``config.model.name``)."""
  def wrap(cls: type[System]) -> type[System]:
    if name in _SYSTEMS:
      raise ValueError(f"System name {name!r} is registered twice ({_SYSTEMS[name]} and {cls}).")
    cls.name = name
    _SYSTEMS[name] = cls
    return cls
  return wrap


def registered() -> dict[str, type[System]]:
  """Name → System class of every registered system."""
  return dict(_SYSTEMS)


def system_class(name: str) -> type[System]:
  if name not in _SYSTEMS:
    raise UnknownSystemError(f"config.model.name={name!r} is not a registered system; known: {sorted(_SYSTEMS)}.")
  return _SYSTEMS[name]


def get_system(config: ml_collections.ConfigDict) -> System:
  """The system named by ``config.model.name``, configured from ``config``."""
  return system_class(config.model.name)(config)


def get_model(model_config: Any) -> nn.Module:
  """The Flax module of the system named ``model_config.name``, from ``model_config`` alone."""
  return system_class(model_config.name).module_class.from_config(model_config)


def presets(name: str) -> tuple[str, ...]:
  """The presets of ``configs/<name>.py`` (its ``PRESETS``; the first is the default)."""
  return tuple(importlib.import_module(f"configs.{name}").PRESETS)


from rrg_jax.models import align2gen, camanet, ct_agrg, r2gen, radgen  # noqa: E402,F401  (register the systems)
