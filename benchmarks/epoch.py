r"""One CAMANet training epoch as the official trainer runs it — the train steps, then beam-3 evaluation of val and
test — rrg_jax vs the PyTorch reference, on the same weights, with the same CPUs.

    python benchmarks/epoch.py [--configs iu_xray,mimic_cxr] [--batch-size B] [--train-steps 2] [--eval-batches 1]
        [--warmup 1] [--threads N] [--host-devices N] [--eos-bias -30] [--quick]

Measured at each preset's batch size (``--batch-size`` overrides it; the official trainer uses one batch size for
train, val and test), each side's median of interleaved calls (train steps after ``--warmup`` untimed ones):

* train step — JAX: the production step (``train_step.jax_train_step``) on the devices ``rrg_jax.train`` uses
  (on a CPU host every core as a data-parallel device, ``sharding.use_cpu_cores``; ``--host-devices`` overrides);
  torch: ``train_step.torch_train_step`` (``tests/torch_reference``, value clipping, two-group AMSGrad);
* one evaluation batch — JAX: beam 3 with the KV / relational-memory cache (``decoding.encode_and_decode``, what
  ``System.generate`` runs in ``rrg_jax.evaluate``), encoder included; torch: the original's beam search
  (``torch_reference.camanet.beam_search``: decoder and relational memory re-run over the whole prefix every step,
  always ``max_seq_length`` steps). Decoding runs first, on the shared initial weights; then the train steps.

Extrapolated epoch = ``train // B`` steps (the official loader drops the last partial batch; so does ours) +
the val and test batches: JAX pads the last partial batch to ``B`` (counted as a full batch), torch runs it at
its own size (counted in proportion to its rows). Scoring the reports (pycocoevalcap, the same on both sides) is
left out. Split sizes: IU X-Ray 2,069 / 296 / 590 (R2Gen's split, spec §2.1) and MIMIC-CXR 270,790 / 2,130 /
3,858 (R2Gen's). With random weights every beam runs the full length (``--eos-bias`` −30: EOS never wins), so
the JAX early exit plays no part: a trained model's shorter reports would favour JAX further.

Output: a markdown table per config (seconds per train step and per evaluation batch, extrapolated train / eval /
epoch minutes per side), then ``ratio jax/torch epoch <config>: x.xx`` lines (torch time / JAX time; the
``iu_xray`` preset extrapolated to IU X-Ray, ``mimic_cxr`` to MIMIC-CXR) and the same for the train and eval
parts.
"""

from __future__ import annotations

import argparse
import gc
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from benchmarks import _common as C  # noqa: E402
from benchmarks import decode, train_step  # noqa: E402

SPLITS = {"iu_xray": (2069, 296, 590), "mimic_cxr": (270790, 2130, 3858)}  # train / val / test records


def epoch_seconds(split: tuple[int, int, int], b: int, step_s: float, batch_s: float, *, pads: bool
                  ) -> tuple[float, float]:
  """(train seconds, eval seconds) of one epoch over ``split`` at batch ``b``; ``pads``: the last partial eval
  batch costs a full one (JAX), else its share of one (torch)."""
  train, *evals = split
  batches = sum(math.ceil(n / b) if pads else n / b for n in evals)
  return train // b * step_s, batches * batch_s


def time_one(preset: str, b: int, devices: int, args) -> dict:
  import jax

  config = C.full_config(preset)
  config.train.batch_size = b
  max_len = config.data.max_seq_length
  batch = C.make_batch(config, b)
  timages = C.torch_images(batch["images"])
  tmodel = C.torch_model(config, timages, eos_bias=args.eos_bias)
  model, variables = C.to_flax(tmodel, config)

  jax_decode, decode_compile_s = decode.jax_decoders(model, variables, batch["images"], max_len,
                                                     names=("jax cached",))["jax cached"]
  torch_decode = decode.torch_decoders(tmodel, timages, max_len)["torch"]
  eval_times = C.interleaved({"jax": jax_decode, "torch": torch_decode}, warmup=0, repeats=args.eval_batches)
  print(f"  {preset} b{b}: decoding jax {C.median(eval_times['jax']):.1f} s, torch "
        f"{C.median(eval_times['torch']):.1f} s per batch", file=sys.stderr, flush=True)

  jax_step, _, train_compile_s = train_step.jax_train_step(config, variables, batch, devices=devices)
  del variables
  torch_step = train_step.torch_train_step(config, tmodel, batch)
  train_times = C.interleaved({"jax": jax_step, "torch": torch_step}, warmup=args.warmup, repeats=args.train_steps)
  jax.clear_caches()
  return {"step": {k: C.median(v) for k, v in train_times.items()},
          "batch": {k: C.median(v) for k, v in eval_times.items()},
          "compile_s": {"train": train_compile_s, "decode": decode_compile_s}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="iu_xray,mimic_cxr", help="presets, each extrapolated to its dataset")
  parser.add_argument("--batch-size", type=int, default=None, help="instead of each preset's batch size")
  parser.add_argument("--train-steps", type=int, default=2, help="timed train steps per side")
  parser.add_argument("--eval-batches", type=int, default=1, help="timed evaluation batches per side")
  parser.add_argument("--warmup", type=int, default=1, help="untimed train steps per side (decoding: none)")
  parser.add_argument("--threads", type=int, default=None, help="CPUs for both sides (default: all available)")
  parser.add_argument("--host-devices", type=int, default=None,
                      help="CPU host: JAX train devices (default: as rrg_jax.train, every core)")
  parser.add_argument("--eos-bias", type=float, default=-30.0, help="added to the EOS logit bias")
  parser.add_argument("--quick", action="store_true", help="iu_xray at batch 2, 1 step, 1 batch (a smoke test)")
  args = parser.parse_args()
  if args.quick:
    args.configs, args.batch_size, args.train_steps, args.eval_batches, args.warmup = "iu_xray", 2, 1, 1, 1

  import jax
  import torch  # noqa: F401  (limit_cpus sets its threads)
  from rrg_jax import sharding

  threads = C.limit_cpus(args.threads)
  C.set_host_devices(args.host_devices or threads)
  print(C.describe_machine(), f"| beam {decode.BEAM}, EOS bias {args.eos_bias:+g}, threads {threads}", flush=True)
  ratios = []
  for preset in args.configs.split(","):
    b = args.batch_size or int(C.full_config(preset).train.batch_size)
    devices = sharding.devices_for_batch(b, len(jax.devices())) if jax.default_backend() == "cpu" else 1
    r = time_one(preset, b, devices, args)
    rows, parts = [], {}
    for side in ("jax", "torch"):
      parts[side] = epoch_seconds(SPLITS[preset], b, r["step"][side], r["batch"][side], pads=side == "jax")
      name = f"jax ({devices} device{'s' * (devices > 1)})" if side == "jax" else "torch"
      rows.append([preset, str(b), name, C.fmt(r["step"][side], 2), C.fmt(r["batch"][side], 2),
                   C.fmt(parts[side][0] / 60), C.fmt(parts[side][1] / 60), C.fmt(sum(parts[side]) / 60)])
    print(C.markdown_table(["config", "batch", "side", "s/train step", "s/eval batch", "train min", "eval min",
                            "epoch min"], rows))
    print(f"compile s: train step {r['compile_s']['train']:.1f}, decoder {r['compile_s']['decode']:.1f}",
          flush=True)
    (jt, je), (tt, te) = parts["jax"], parts["torch"]
    ratios += [(f"epoch {preset}", (tt + te) / (jt + je)), (f"train {preset}", tt / jt), (f"eval {preset}", te / je)]
    gc.collect()
  for name, x in ratios:
    print(f"ratio jax/torch {name}: {x:.2f}")


if __name__ == "__main__":
  main()
