r"""CAMANet train-step throughput, rrg_jax vs the PyTorch reference, on the same weights and batch.

    python benchmarks/train_step.py [--configs iu_xray,mimic_cxr] [--batch-sizes 8,32] [--repeats 5] [--warmup 2]
        [--threads N] [--dtype float32|bfloat16] [--remat] [--memory] [--peak-tflops 989] [--quick]
        [--host-devices N]

One step = train-mode forward (dropout as configured, BatchNorm batch statistics), CE + cls_w·BCE + mse_w·VTAC-MSE,
backward, element-wise gradient clipping to ±0.1, two-group Adam/AMSGrad (weight decay 5e-5) update.

* JAX: the production step: ``optim.make_optimizer`` → ``train_state.create_train_state`` →
  ``make_train_step`` (the system's loss, as ``rrg_jax.train``) → ``jit_train_step`` on a 1-device
  ``sharding.create_mesh``, AOT-compiled (``lower().compile()``, timed as "compile"), state donated and fed back.
  ``--dtype bfloat16`` / ``--remat`` set ``config.model.dtype`` / ``config.model.remat`` (JAX only).
  On a CPU host the same step also runs on an N-device mesh (N = ``--host-devices``, default: the CPUs
  ``--threads`` allows, reduced to a divisor of the batch; what ``rrg_jax.train`` uses by default,
  ``sharding.use_cpu_cores``), one more row: the batch split over N host devices, BatchNorm statistics still over
  the whole batch.
* torch: ``tests/torch_reference`` CAMANet in train mode, ``ref.losses``, ``backward()``,
  ``clip_grad_value_(0.1)``, ``torch.optim.Adam`` (visual extractor at lr_ve, the rest at lr_ed, amsgrad) with the
  group lrs set each step from the same lagged warm-up/step schedule; float32 on CPU (torch is CPU-only here).

Both start from the reference's random init (spec §11.4) converted with ``rrg_jax.convert``; the batch is random
images and reports of length T/2..T (the first of length T, so both sides decode T = max_seq_length positions).
Both get the same ``--threads`` CPUs (process CPU affinity, which also sizes XLA:CPU's thread pool, and
``torch.set_num_threads``). Timing: ``--warmup`` untimed steps per side, then ``--repeats`` rounds in which JAX
and torch (full step, then backbone) alternate one blocking step each; the median is reported.

Breakdown: "backbone" is the visual extractor alone (DenseNet-121 per view + 14-way head; CAMs without gradient),
forward + backward of mean(patch_feats) + mean(logits), no optimiser; "rest" = full − backbone (FBL,
encoder-decoder incl. the relational memory, VTAC, losses, optimiser). FLOPs are XLA's cost analysis of the
compiled JAX step (the relational-memory ``scan`` body is counted once, a slight undercount); achieved TFLOP/s of
both sides use that same count; on a GPU also the fraction of ``--peak-tflops``.

``--memory`` instead runs each (side, config, batch) in its own child process (only that framework imported;
JAX weights from ``model.init``, same shapes) and reports: peak RSS of set-up (imports, init, XLA compilation),
RSS just before the steps, peak RSS while ``warmup + repeats`` steps run (the kernel's high-water mark reset via
``/proc/self/clear_refs`` after set-up), the residuals the JAX program keeps for the backward pass
(``jax.vjp``'s, before XLA's fusion and buffer assignment: what ``--remat`` shrinks), XLA's temp-buffer size and, on a
GPU, the device's peak bytes in use.
With ``--remat`` the JAX side is measured both without and with rematerialisation.

Output: a markdown table (its last column: the loss of each side's first and last step; same start, different
dropout draws, so they agree only roughly), then ``ratio jax/torch <name>: <x.xx>`` lines for train_step, backbone
and rest, ratio = torch time / JAX time (higher = JAX faster).
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from benchmarks import _common as C  # noqa: E402

STEPS_PER_EPOCH = 100  # only shapes the LR schedule


# --- JAX ------------------------------------------------------------------------------------------------------

def lower_train_step(config, variables, batch, devices: int = 1):
  """The production step on ``variables`` and ``batch`` over ``devices`` devices, lowered, not yet compiled →
  (lowered, state, inputs)."""
  import jax
  from rrg_jax import models, optim, sharding
  from rrg_jax import train_state as ts

  system = models.get_system(config)
  tx = optim.make_optimizer(config, STEPS_PER_EPOCH)
  mesh = sharding.create_mesh((devices,))
  state = ts.create_train_state(jax.device_put(variables), tx, jax.random.key(config.seed))
  state = jax.device_put(state, ts.state_sharding(state, mesh))
  step = ts.jit_train_step(ts.make_train_step(system, tx), state, mesh, system.batch_fields())
  inputs = jax.device_put(system.device_batch(batch), sharding.batch_sharding(mesh))
  return step.lower(state, inputs), state, inputs


def jax_train_step(config, variables, batch, devices: int = 1):
  """``lower_train_step`` compiled → (run() → loss, compiled executable, compile s). ``run`` blocks on the new
  state and metrics and keeps the new state for the next call."""
  import jax

  lowered, state, inputs = lower_train_step(config, variables, batch, devices)
  compiled, compile_s = C.timed(lowered.compile)
  holder = {"state": state}

  def run() -> float:
    holder["state"], metrics = jax.block_until_ready(compiled(holder["state"], inputs))
    return float(metrics["loss"])

  return run, compiled, compile_s


def jax_backbone(config, variables, images):
  """Visual extractor forward + backward (batch statistics, no optimiser) → (run(), compiled executable)."""
  import jax
  import jax.numpy as jnp
  from rrg_jax.models.camanet import VisualExtractor

  m = config.model
  ve = VisualExtractor(m.num_classes, m.growth_rate, tuple(m.block_config), m.num_init_features, m.bn_size,
                       m.remat, jnp.dtype(m.dtype))

  def loss(params, stats, x):
    out, new = ve.apply({"params": params, "batch_stats": stats}, x, True, mutable=["batch_stats"])
    return jnp.mean(out["patch_feats"].astype(jnp.float32)) + jnp.mean(out["logits"]), new["batch_stats"]

  args = jax.device_put((variables["params"]["visual_extractor"], variables["batch_stats"]["visual_extractor"],
                         images))
  compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile()
  return (lambda: jax.block_until_ready(compiled(*args))), compiled


# --- torch ----------------------------------------------------------------------------------------------------

def torch_train_step(config, tmodel, batch):
  """The reference step → run() → loss."""
  import torch
  from torch_reference import camanet as ref

  o = config.optim
  tmodel.train()
  images, targets, masks, labels = C.torch_inputs(batch)
  ve = list(tmodel.visual_extractor.parameters())
  ve_ids = {id(p) for p in ve}
  ed = [p for p in tmodel.parameters() if id(p) not in ve_ids]
  opt = torch.optim.Adam([{"params": ve, "lr": o.lr_ve}, {"params": ed, "lr": o.lr_ed}], betas=(o.b1, o.b2),
                         eps=o.eps, weight_decay=o.weight_decay, amsgrad=o.amsgrad)
  params = ve + ed
  steps = [0]

  def run() -> float:
    opt.zero_grad(set_to_none=True)
    parts = ref.losses(tmodel(images, targets), targets, masks, labels, config.loss.cls_w, config.loss.mse_w)
    parts["loss"].backward()
    torch.nn.utils.clip_grad_value_(params, o.clip_value)
    for group, base in zip(opt.param_groups, (o.lr_ve, o.lr_ed)):
      group["lr"] = lagged_lr(config, steps[0], base)
    opt.step()
    steps[0] += 1
    return parts["loss"].item()

  return run


def lagged_lr(config, step: int, base_lr: float) -> float:
  """The lr optimizer step ``step`` uses in the official trainer (``rrg_jax.optim.lagged_schedule``)."""
  o = config.optim
  t, warmup = max(step - 1, 0), o.warmup_epochs * STEPS_PER_EPOCH
  if t < warmup:
    return o.warmup_lr + t * (base_lr - o.warmup_lr) / warmup
  return base_lr * o.decay_rate ** (t // max(o.decay_epochs * STEPS_PER_EPOCH, 1))


def torch_backbone(tmodel, images):
  """``tmodel.visual_extractor`` forward + backward of mean(patch_feats) + mean(logits) → run()."""
  tmodel.train()

  def run() -> None:
    tmodel.zero_grad(set_to_none=True)
    patch_feats, _, logits, _ = tmodel.visual_extractor(images)
    (patch_feats.mean() + logits.mean()).backward()

  return run


# --- modes ----------------------------------------------------------------------------------------------------

def time_one(preset: str, b: int, args) -> dict:
  """Interleaved timings of one (config, batch)."""
  import jax
  from rrg_jax import sharding

  config = C.full_config(preset, dtype=args.dtype, remat=args.remat)
  batch = C.make_batch(config, b)
  tmodel = C.torch_model(config)
  _, variables = C.to_flax(tmodel, config)
  jax_run, compiled, compile_s = jax_train_step(config, variables, batch)
  jax_bb, bb_compiled = jax_backbone(config, variables, batch["images"])
  n = sharding.devices_for_batch(b, len(jax.devices())) if jax.default_backend() == "cpu" else 1
  multi, sides = f"jax {n} devices", {}
  loss = {"jax": [], "torch": []}
  if n > 1:
    jax_n_run, _, compile_n_s = jax_train_step(config, variables, batch, devices=n)
    loss[multi] = []
    sides[multi] = lambda: loss[multi].append(jax_n_run())
  del variables
  torch_run = torch_train_step(config, tmodel, batch)
  torch_bb = torch_backbone(tmodel, C.torch_inputs(batch)[0])
  sides.update({"jax": lambda: loss["jax"].append(jax_run()), "torch": lambda: loss["torch"].append(torch_run()),
                "jax_bb": jax_bb, "torch_bb": torch_bb})
  times = C.interleaved(sides, warmup=args.warmup, repeats=args.repeats)
  compile_s = {"jax": compile_s, **({multi: compile_n_s} if n > 1 else {})}
  return dict(config=preset, batch=b, times={k: C.median(v) for k, v in times.items()}, compile_s=compile_s,
              flops=C.xla_flops(compiled), bb_flops=C.xla_flops(bb_compiled), loss=loss, host_devices=n)


def child(args) -> None:
  """``--child jax|torch``: set-up, steps and one JSON line of memory figures (see the module docstring)."""
  preset, b = args.configs, int(args.batch_sizes)
  config = C.full_config(preset, dtype=args.dtype, remat=args.remat)
  batch = C.make_batch(config, b)
  extra = {}
  if args.child == "torch":
    import torch  # noqa: F401  (limit_cpus sets its threads)

    C.limit_cpus(args.threads)
    run = torch_train_step(config, C.torch_model(config), batch)
  else:
    import jax
    from rrg_jax import models
    from rrg_jax import train_state as ts

    C.limit_cpus(args.threads)
    system = models.get_system(config)
    variables = jax.device_get(jax.jit(system.init)(jax.random.key(0)))
    run, compiled, _ = jax_train_step(config, variables, batch)
    extra = {"xla_temp_mib": C.xla_temp_mib(compiled),
             "residual_mib": C.saved_residual_mib(
                 lambda p: ts.training_loss(system, p, variables["batch_stats"], batch, jax.random.key(0))[0],
                 variables["params"])}
    del variables
  gc.collect()
  setup_peak = C.rss_mib()
  reset = C.reset_peak_rss()
  before = C.current_rss_mib()
  for _ in range(args.warmup + args.repeats):
    run()
  out = dict(setup_peak_mib=setup_peak, before_mib=before, step_peak_mib=C.rss_mib(), reset=reset, **extra)
  if args.child == "jax":
    out["device_peak_mib"] = C.device_peak_mib()
  print(json.dumps(out), flush=True)


def memory(args, presets, batch_sizes) -> None:
  sides = [("torch", "float32", False), ("jax", args.dtype, False)] + ([("jax", args.dtype, True)] if args.remat
                                                                        else [])
  rows, reset_ok = [], True
  for preset in presets:
    for b in batch_sizes:
      for side, dtype, remat in sides:
        argv = ["--child", side, "--configs", preset, "--batch-sizes", str(b), "--dtype", dtype, "--warmup",
                str(args.warmup), "--repeats", str(args.repeats)]
        argv += (["--remat"] if remat else []) + (["--threads", str(args.threads)] if args.threads else [])
        r = C.run_child(__file__, argv)
        reset_ok &= r["reset"]
        name = side + (f" {dtype}" if side == "jax" else " float32") + (" remat" if remat else "")
        rows.append([preset, str(b), name, C.fmt(r["setup_peak_mib"], 0), C.fmt(r["before_mib"], 0),
                     C.fmt(r["step_peak_mib"], 0), C.fmt(r["step_peak_mib"] - r["before_mib"], 0),
                     C.fmt(r.get("residual_mib", float("nan")), 0), C.fmt(r.get("xla_temp_mib", float("nan")), 0),
                     C.fmt(r.get("device_peak_mib", float("nan")), 0)])
        print(f"  measured {preset} b{b} {name}", file=sys.stderr, flush=True)
  print(C.markdown_table(["config", "batch", "side", "set-up peak RSS MiB", "RSS before steps MiB",
                          "peak RSS in steps MiB", "steps − before MiB", "JAX residuals MiB", "XLA temp MiB",
                          "device peak MiB"], rows))
  if not reset_ok:
    print("note: /proc/self/clear_refs was not writable: 'peak RSS in steps' includes the set-up peak")


def main() -> None:
  parser = C.base_parser(__doc__.split("\n\n")[0], batch_sizes="8,32")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="JAX compute dtype")
  parser.add_argument("--remat", action="store_true", help="JAX: rematerialise DenseNet layers")
  parser.add_argument("--memory", action="store_true", help="peak memory per side in child processes")
  parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak (H100/H200 bf16 dense)")
  parser.add_argument("--host-devices", type=int, default=None,
                      help="CPU host: JAX devices of the second JAX row (default: the --threads CPUs)")
  parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = C.parse_args(parser)
  if args.child:
    return child(args)
  presets = args.configs.split(",")
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  if args.memory:
    return memory(args, presets, batch_sizes)

  import jax
  import torch  # noqa: F401  (limit_cpus sets its threads)

  threads = C.limit_cpus(args.threads)
  C.set_host_devices(args.host_devices or threads)
  print(C.describe_machine(), f"| JAX dtype {args.dtype}, remat {args.remat}, threads {threads}", flush=True)
  gpu = jax.default_backend() == "gpu"
  rows, ratios = [], []
  for preset in presets:
    for b in batch_sizes:
      r = time_one(preset, b, args)
      t, tag = r["times"], f"{preset} b{b}"
      multi = f"jax {r['host_devices']} devices"
      for side in ("jax", multi, "torch") if multi in t else ("jax", "torch"):
        full, bb = t[side], t.get(f"{side}_bb")
        name = side if side == "torch" else side.replace("jax", f"jax {args.dtype}") + (" remat" if args.remat else "")
        row = [preset, str(b), name, C.fmt(1e3 * full), C.fmt(b / full),
               C.fmt(1e3 * bb) if bb else "-", C.fmt(1e3 * (full - bb)) if bb else "-",
               C.fmt(r["compile_s"][side]) if side in r["compile_s"] else "-", C.fmt(r["flops"] / 1e9, 0),
               C.fmt(r["flops"] / full / 1e12, 3)]
        if gpu:
          row.append(C.fmt(100 * r["flops"] / full / 1e12 / args.peak_tflops, 1) + "%" if side == "jax" else "-")
        row.append(f"{r['loss'][side][0]:.3f} → {r['loss'][side][-1]:.3f}")
        rows.append(row)
      ratios += [(f"train_step {tag}", t["torch"] / t["jax"]), (f"backbone {tag}", t["torch_bb"] / t["jax_bb"]),
                 (f"rest {tag}", (t["torch"] - t["torch_bb"]) / max(t["jax"] - t["jax_bb"], 1e-9))]
      if multi in t:
        ratios.append((f"train_step {multi} {tag}", t["torch"] / t[multi]))
      print(f"  done {tag}: jax {1e3 * t['jax']:.0f} ms, torch {1e3 * t['torch']:.0f} ms; backbone GFLOP "
            f"{r['bb_flops'] / 1e9:.0f} of {r['flops'] / 1e9:.0f}", file=sys.stderr, flush=True)
      gc.collect()
  headers = ["config", "batch", "side", "ms/step", "examples/s", "backbone ms", "rest ms", "compile s",
             "GFLOP/step (XLA)", "TFLOP/s"] + (["% of peak"] if gpu else []) + ["loss first → last"]
  print(C.markdown_table(headers, rows))
  for name, x in ratios:
    print(f"ratio jax/torch {name}: {x:.2f}")


if __name__ == "__main__":
  main()
