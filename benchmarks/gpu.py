r"""The accelerator table, JAX only, in one short run (under 8 minutes on one H100/H200; never part of the tests).

    python benchmarks/gpu.py [--steps 5] [--warmup 2] [--only camanet,r2gen,align2gen,radgen,decode] [--peak-tflops X]
    python benchmarks/gpu.py --tiny        # the tests' tiny configs: a smoke test of the script on a CPU

Rows, each the production train step (``train_step.lower_train_step``: the system's loss, clipping, optimiser,
donated state, one device) on random weights (``System.init``) and a random batch of the system's declared
fields (``System.random_batch``):

* CAMANet ``iu_xray`` batch 32 and ``mimic_cxr`` batch 64, each in float32 and bfloat16 (``model.dtype``), each
  without and with DenseNet rematerialisation (``model.remat``);
* R2Gen ``iu_xray`` and ``mimic_cxr``, Align2Gen ``mimic_cxr`` (lesion crops, GAB, LAB) and RadGen ``radgen``
  (Swin-B + BART-base + BERT-base, beam-4 generation inside the step, word vocabulary of BART's size) at their
  presets' batch sizes, float32 and bfloat16;
* CAMANet beam-3 decoding with the cache (``decoding.encode_and_decode``, encoder included) at the two presets'
  batch sizes, every beam running the full length (EOS logit bias −30): reports/s.

Columns: median ms per call over ``--steps`` after ``--warmup``; examples (reports) per second; compile seconds;
the program's device memory as XLA plans it (arguments + outputs + temporaries − aliased, GiB); achieved TFLOP/s
from XLA's cost analysis (loop bodies counted once: decoding's FLOP/s is a lower bound) and its fraction of the
chip's dense bf16 peak (``PEAK_BF16_TFLOPS`` by device kind, or ``--peak-tflops``). Every program is compiled
first, in parallel threads (XLA compiles outside the GIL), then timed one after another; the last line gives the
device's peak memory in use over the whole run (``memory_stats``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from benchmarks import _common as C  # noqa: E402
from benchmarks import decode, train_step  # noqa: E402

# Dense bf16 peak TFLOP/s by device kind (first substring match): NVIDIA's and Google's data sheets.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("TPU v6", 918.0),
                    ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0))
DECODE_EOS_BIAS = -30.0


def peak_tflops(device_kind: str) -> float | None:
  return next((p for name, p in PEAK_BF16_TFLOPS if name in device_kind), None)


def cases(tiny: bool, only: set[str]) -> list[dict]:
  """(kind, label, config, batch) of every row."""
  from configs import align2gen, camanet, r2gen, radgen
  import conftest

  out = []

  def add(kind: str, system: str, preset: str, config, batch: int, dtype: str = "float32", remat: bool = False):
    config.model.dtype, config.model.remat = dtype, remat
    if "text_tokenizer_vocab_size" in config.data and config.model.bert.vocab_size < 0:  # Align2Gen's BERT
      config.model.bert.vocab_size = int(config.data.text_tokenizer_vocab_size)
    label = f"{system} {preset} b{batch} {dtype}" + (" remat" if remat else "")
    out.append(dict(kind=kind, label=label, config=config, batch=batch))

  def full(module, preset: str):
    c = conftest.TINY_CONFIGS[module.__name__.split(".")[-1]]() if tiny else module.get_config(preset)
    if not tiny:
      c.model.vocab_size = C.VOCAB[preset]
    return c

  for preset, b in (("iu_xray", 32), ("mimic_cxr", 64)):
    b = 2 if tiny else b
    if "camanet" in only:
      for dtype in ("float32", "bfloat16"):
        for remat in (False, True):
          add("train", "camanet", preset, full(camanet, preset), b, dtype, remat)
    if "decode" in only:
      add("decode", "camanet", preset, full(camanet, preset), b)
  for module, presets in ((r2gen, ("iu_xray", "mimic_cxr")), (align2gen, ("mimic_cxr",)), (radgen, ("radgen",))):
    name = module.__name__.split(".")[-1]
    if name not in only:
      continue
    for preset in presets:
      for dtype in ("float32", "bfloat16"):
        c = full(module, preset)
        add("train", name, preset, c, 2 if tiny else int(c.train.batch_size), dtype)
  return out


def lower(case: dict):
  """→ (lowered program, args, state holder) of one case, ready to compile."""
  import jax
  import numpy as np
  from rrg_jax import decoding, models

  config, b = case["config"], case["batch"]
  system = models.get_system(config)
  variables = jax.jit(system.init)(jax.random.key(0))
  batch = system.random_batch(b, seed=0)
  if case["kind"] == "decode":
    p = variables["params"]
    ed, logit = p["encoder_decoder"], p["encoder_decoder"]["logit"]
    logit = {**logit, "bias": logit["bias"].at[0].add(DECODE_EOS_BIAS)}  # EOS (id 0) never wins: full length
    variables = {**variables, "params": {**p, "encoder_decoder": {**ed, "logit": logit}}}
    images = jax.device_put(np.asarray(batch["images"]))
    lowered = decoding.encode_and_decode.lower(system.module, variables, (images,), method="beam",
                                               beam_size=decode.BEAM, max_len=int(config.data.max_seq_length),
                                               cached=True)
    return lowered, (variables, images), None
  lowered, state, inputs = train_step.lower_train_step(config, variables, batch)
  return lowered, (inputs,), {"state": state}


def planned_gib(compiled) -> float:
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**30
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return float("nan")


def time_case(case: dict, compiled, args_, holder, steps: int, warmup: int) -> float:
  """Median seconds per call."""
  import jax

  def call():
    if holder is None:
      jax.block_until_ready(compiled(*args_))
    else:
      holder["state"], metrics = compiled(holder["state"], *args_)
      jax.block_until_ready(metrics)

  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return C.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed calls per row")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls per row")
  parser.add_argument("--only", default="camanet,r2gen,align2gen,radgen,decode", help="row groups to run")
  parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak TFLOP/s")
  parser.add_argument("--tiny", action="store_true", help="tests' tiny configs at batch 2 (CPU smoke test)")
  parser.add_argument("--compile-threads", type=int, default=8, help="programs compiled at once")
  args = parser.parse_args()

  import jax

  started = time.perf_counter()
  device = jax.devices()[0]
  peak = args.peak_tflops or peak_tflops(device.device_kind)
  print(C.describe_machine(), f"| peak bf16 {peak or '?'} TFLOP/s", flush=True)
  todo = cases(args.tiny, set(args.only.split(",")))
  prepared = [lower(c) for c in todo]
  with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
    def compile_one(p):
      t0 = time.perf_counter()
      return p[0].compile(), time.perf_counter() - t0
    compiled = list(pool.map(compile_one, prepared))
  print(f"set-up and compilation of {len(todo)} programs: {time.perf_counter() - started:.0f} s", file=sys.stderr,
        flush=True)
  rows = []
  for case, (_, args_, holder), (exe, compile_s) in zip(todo, prepared, compiled):
    sec = time_case(case, exe, args_, holder, args.steps, args.warmup)
    flops = C.xla_flops(exe)
    tflops = flops / sec / 1e12
    rows.append([case["kind"], case["label"], C.fmt(1e3 * sec), C.fmt(case["batch"] / sec), C.fmt(compile_s),
                 C.fmt(planned_gib(exe), 2), C.fmt(tflops, 1),
                 C.fmt(100 * tflops / peak, 1) + "%" if peak else "-"])
    print(f"  {case['label']}: {1e3 * sec:.1f} ms", file=sys.stderr, flush=True)
    if holder is not None:
      holder.clear()  # free the state before the next row
  print(C.markdown_table(["kind", "row", "ms/call", "examples/s", "compile s", "XLA memory GiB", "TFLOP/s",
                          "of bf16 peak"], rows))
  print(f"device peak memory in use: {C.device_peak_mib() / 1024:.2f} GiB; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
