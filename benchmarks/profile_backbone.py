r"""Where the DenseNet-121 train step's time goes: XLA's executed ops grouped by kind, from one profiled step.

    python benchmarks/profile_backbone.py [--batch 8] [--image-size 224] [--threads N] [--dtype float32]
        [--repeats 3] [--top 15] [--torch]

Compiles forward (train-mode BatchNorm) + backward of ``mean(DenseNet(x))`` — the per-view unit of CAMANet's
visual extractor — times ``--repeats`` steps (median), then runs one step under ``jax.profiler`` and sums the
duration of every executed XLA op (thunk) from the trace, classified with the optimised HLO
(``compiled.as_text()``):

* ``conv forward`` / ``conv input-grad`` / ``conv weight-grad``: convolutions (3×3, 7×7; the source op's metadata
  says forward (``jvp``) or transposed (``transpose(jvp``); weight gradients, which XLA builds with an H×W window,
  carry none),
* ``dot``: matmuls (the 1×1 convolutions, ``layers.conv.PointwiseConv``, in all three directions),
* ``layout copy``: transposes/copies that change an array's layout (XLA:CPU makes channel-major copies of the
  activations for the weight gradients),
* ``reduction``: fusions containing a reduce (BatchNorm statistics and their gradients),
* ``pooling``: reduce-window / select-and-scatter and their index helpers (max/avg pool and gradients),
* ``elementwise``: the rest (BatchNorm apply, ReLU, concatenation, slices).

Op times are summed over XLA's threads, so their total exceeds the wall time when ops run in parallel.
``--torch`` also times the same step in the torch reference (``tests/torch_reference``, same thread count).
Prints a table; nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from benchmarks import _common as C  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*$", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)


def hlo_index(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
  """Optimised HLO text → ({instruction name: its line}, {computation name: its body})."""
  lines = {m.group(1): m.group(0) for m in _INSTRUCTION.finditer(hlo)}
  bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo)}
  return lines, bodies


def classify(name: str, lines: dict[str, str], bodies: dict[str, str]) -> str | None:
  """The kind (see the module docstring) of the executed op ``name``; None for runtime events that are no op."""
  line = lines.get(name)
  if line is None:
    return None
  called = re.search(r"calls=%?([\w.\-]+)", line)
  text = line + "\n" + (bodies.get(called.group(1), "") if called else "")
  if re.search(r"\bconvolution\(", text):
    if "transpose(jvp(" in text:
      return "conv input-grad"
    return "conv forward" if "jvp(" in text else "conv weight-grad"
  if re.search(r"\bdot\(", text):
    return "dot"
  if re.search(r"\b(reduce-window|select-and-scatter|iota|scatter)\(", text) or "reduce-window" in name:
    return "pooling"
  if re.search(r"\breduce\(", text):
    return "reduction"
  if re.search(r"\b(transpose|copy)\(", text) or re.match(r"(transpose|copy|bitcast_copy)", name):
    return "layout copy"
  return "elementwise"


def op_times(trace_dir: str, lines: dict[str, str], bodies: dict[str, str]) -> tuple[dict, dict]:
  """Profiler trace → ({kind: µs}, {op name: µs}) summed over all executions and threads."""
  (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  by_kind, by_op = collections.defaultdict(float), collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X":
      continue
    kind = classify(e["name"], lines, bodies)
    if kind is not None:
      by_kind[kind] += e["dur"]
      by_op[e["name"]] += e["dur"]
  return by_kind, by_op


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--threads", type=int, default=None)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--top", type=int, default=15, help="also list the N slowest single ops")
  parser.add_argument("--torch", action="store_true", help="also time the torch reference")
  args = parser.parse_args()
  if args.torch:
    import torch  # noqa: F401  (limit_cpus sets its threads)
  C.limit_cpus(args.threads)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from rrg_jax.layers.densenet import DenseNet

  model = DenseNet(dtype=jnp.dtype(args.dtype))
  x = np.random.default_rng(0).standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32)
  variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))

  def loss(params, stats, images):
    y, new = model.apply({"params": params, "batch_stats": stats}, images, True, mutable=["batch_stats"])
    return jnp.mean(y.astype(jnp.float32)), new

  inputs = (variables["params"], variables["batch_stats"], jax.device_put(x))
  compiled, compile_s = C.timed(lambda: jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*inputs).compile())
  run = {"jax": lambda: jax.block_until_ready(compiled(*inputs))}
  if args.torch:
    run["torch"] = torch_step(args.batch, args.image_size, x)
  times = C.interleaved(run, warmup=1, repeats=args.repeats)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    run["jax"]()
    jax.profiler.stop_trace()
    by_kind, by_op = op_times(trace_dir, *hlo_index(compiled.as_text()))

  print(C.describe_machine())
  wall = C.median(times["jax"]) * 1e3
  print(f"DenseNet-121 train step, batch {args.batch}, {args.image_size}², {args.dtype}: {wall:,.0f} ms "
        f"(median of {args.repeats}; compile {compile_s:.1f} s; {C.xla_flops(compiled) / 1e9:.0f} GFLOP)")
  if args.torch:
    t = C.median(times["torch"]) * 1e3
    print(f"torch reference: {t:,.0f} ms\nratio jax/torch densenet b{args.batch}: {t / wall:.2f}")
  total = sum(by_kind.values())
  rows = [[k, f"{v / 1e3:,.1f}", f"{100 * v / total:.1f}"] for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
  rows.append(["all ops (summed over threads)", f"{total / 1e3:,.1f}", "100.0"])
  print(C.markdown_table(["kind", "op ms", "%"], rows))
  if args.top:
    print(f"\nslowest {args.top} ops:")
    for name, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
      print(f"  {us / 1e3:8.1f} ms  {name}")


def torch_step(batch: int, image_size: int, x):
  """The torch reference DenseNet features + ReLU, train mode, forward + backward of the mean → run()."""
  import torch
  import torch.nn.functional as F
  from torch_reference.camanet import densenet_features

  net, _ = densenet_features()
  net.train()
  images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

  def run() -> None:
    net.zero_grad(set_to_none=True)
    F.relu(net(images)).mean().backward()

  return run


if __name__ == "__main__":
  main()
