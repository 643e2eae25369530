"""``python -m rrg_jax.models``: the registered systems, their config files and presets."""

from rrg_jax import models


def main() -> None:
  print("Registered systems (python -m rrg_jax.train --config=configs/<system>.py[:preset]):")
  for name, cls in sorted(models.registered().items()):
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    presets = models.presets(name)
    print(f"  {name:10s} configs/{name}.py  presets: {presets[0]} (default), {', '.join(presets[1:])}")
    if summary:
      print(f"  {'':10s} {summary}")


if __name__ == "__main__":
  main()
