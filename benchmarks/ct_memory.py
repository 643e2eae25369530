r"""Device memory of one full-size CT-AGRG train step as XLA plans it (no weights, no data: abstract shapes only).

    python benchmarks/ct_memory.py [--stages stage1,stage2] [--variants fp32,bf16,bf16_remat] [--batch N]

For each stage (``pretrain``, ``stage1``, ``stage2`` at the original recipe's batch: 4, 4, 8) and each variant
(``model.dtype`` float32 / bfloat16, ``model.remat`` off / on), the production train step of that stage (the
system's loss, the frozen groups without gradient, the optimiser with its accumulation, donated state; volumes
240 × 480 × 480, ResNet-18, GPT-2 medium) is lowered from ``jax.ShapeDtypeStruct`` s and compiled for the local
backend, and ``compiled.memory_analysis()`` is printed: arguments, outputs, temporaries, the aliased (donated)
bytes and their total (arguments + outputs + temporaries − aliased), in GiB, and ``residuals``: the arrays the
backward pass keeps (``jax.vjp``'s residuals of the step's loss, from shapes alone — the part bfloat16 and remat act
on, whatever a backend's scheduler then makes of them). On a CPU this is XLA:CPU's plan — the
same program on a GPU plans differently (fusion, layouts), so treat it as an estimate; with a GPU the numbers are
the GPU's. Compilation of the full model takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

VARIANTS = {"fp32": ("float32", False), "fp32_remat": ("float32", True), "bf16": ("bfloat16", False),
            "bf16_remat": ("bfloat16", True)}
BATCH = {"pretrain": 4, "stage1": 4, "stage2": 8}
GIB = 1 << 30


def planned_memory(stage: str, dtype: str, remat: bool, batch: int) -> dict[str, float]:
  """XLA's memory plan (GiB) and compile seconds of ``stage``'s full-size train step."""
  import jax
  from configs import ct_agrg
  from rrg_jax import models, optim, train
  from rrg_jax import train_state as ts

  config = train.stage_config(ct_agrg.get_config("stage2"), stage)
  config.model.dtype, config.model.remat = dtype, remat
  config.model.vocab_size = 50257
  config.train.batch_size = batch
  system = models.get_system(config)
  tx = optim.make_optimizer(config, steps_per_epoch=64)
  variables = system.abstract_variables()
  state = jax.eval_shape(lambda v: ts.create_train_state(v, tx, jax.random.key(0)), variables)
  step = ts.make_train_step(system, tx, optim.without_gradient(config, optim.frozen_groups(config, 0)))
  inputs = {k: jax.ShapeDtypeStruct((batch,) + f.shape, f.dtype) for k, f in system.batch_fields().items()}
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, inputs).compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
  parts = {k: v / GIB for k, v in parts.items()}
  parts["total"] = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
  parts["compile_s"] = seconds
  # What the backward pass keeps (jax.vjp's residuals; shapes only, backend-independent): where bf16 and remat act.
  cut = optim.without_gradient(config, optim.frozen_groups(config, 0))
  residuals = jax.eval_shape(lambda p, stats, batch: jax.tree.leaves(jax.vjp(
      lambda q: ts.training_loss(system, cut(q), stats, batch, jax.random.key(0))[0], p)[1]),
      state.params, state.batch_stats, inputs)
  parts["residuals"] = sum(r.size * r.dtype.itemsize for r in residuals) / GIB
  return parts


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--stages", default="stage1,stage2")
  p.add_argument("--variants", default="fp32,bf16,bf16_remat")
  p.add_argument("--batch", type=int, default=0, help="batch size (default: the recipe's per stage)")
  args = p.parse_args()
  import jax

  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); GiB as XLA plans them")
  print(f"{'stage':8s} {'variant':11s} {'batch':>5s} {'args':>8s} {'outputs':>8s} {'temps':>8s} {'aliased':>8s} "
        f"{'total':>8s} {'residuals':>9s} {'compile s':>9s}")
  for stage in args.stages.split(","):
    for variant in args.variants.split(","):
      dtype, remat = VARIANTS[variant]
      batch = args.batch or BATCH[stage]
      m = planned_memory(stage, dtype, remat, batch)
      print(f"{stage:8s} {variant:11s} {batch:5d} {m['arguments']:8.2f} {m['outputs']:8.2f} {m['temporaries']:8.2f} "
            f"{m['aliased']:8.2f} {m['total']:8.2f} {m['residuals']:9.2f} {m['compile_s']:9.1f}", flush=True)


if __name__ == "__main__":
  main()
