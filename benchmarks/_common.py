"""Shared set-up of the JAX-vs-torch benchmarks (``train_step.py``, ``decode.py``): the same full-size CAMANet
weights and batch on both sides, CPU pinning, interleaved timing, peak-RSS bookkeeping and table printing.

jax and torch are imported inside the functions that need them, so a ``--memory`` child process loads (and
counts in its RSS) only its own framework.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from configs import camanet as camanet_config

# Vocabulary sizes K = |vocab| + 1: IU X-Ray (spec §11) and a MIMIC-CXR-sized one (threshold 10).
VOCAB = {"iu_xray": 761, "mimic_cxr": 4300, "radgen": 50265}  # radgen: BART's vocabulary size for the word model


# --- machine ---------------------------------------------------------------------------------------------------

def limit_cpus(n: int | None) -> int:
  """Pins this process (and its children) to ``n`` of its CPUs (default: all) and sets torch's intra-op threads to
  ``n``. XLA:CPU sizes its thread pool from the schedulable CPUs, so call this before the first jax computation."""
  cpus = sorted(os.sched_getaffinity(0))
  n = len(cpus) if n is None else max(1, min(n, len(cpus)))
  if n < len(cpus):
    os.sched_setaffinity(0, cpus[:n])
  if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(n)
  return n


def set_host_devices(n: int) -> None:
  """Exposes ``n`` CPU devices (``jax_num_cpu_devices``) unless ``XLA_FLAGS`` already sets the count; call before
  the first jax computation."""
  import jax

  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", n)


def rss_mib() -> float:
  """Peak resident set size of this process so far (``ru_maxrss``; KiB on Linux) in MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
  """Resident set size of this process now (``VmRSS``) in MiB; NaN where /proc is unavailable."""
  try:
    with open("/proc/self/status") as f:
      m = re.search(r"VmRSS:\s+(\d+)", f.read())
  except OSError:
    m = None
  return int(m.group(1)) / 1024 if m else float("nan")


def reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0), so that ``rss_mib``
  afterwards is the peak since now. False where that is not possible (the peak then includes the set-up)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


# --- model and batch -------------------------------------------------------------------------------------------

def full_config(preset: str, *, dtype: str = "float32", remat: bool = False):
  """The preset's full-size config with the benchmark vocabulary, JAX compute ``dtype`` and ``remat``."""
  c = camanet_config.get_config(preset)
  c.model.vocab_size = VOCAB[preset]
  c.model.dtype = dtype
  c.model.remat = remat
  return c


def make_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """``torch_reference.batches.random_batch`` with report lengths (BOS + words + EOS) uniform in [T/2, T], the
  first one T, so that the torch collate (cut to the batch's own longest report) and the JAX pad length are both
  T = ``max_seq_length``."""
  from torch_reference.batches import random_batch  # pylint: disable=g-import-not-at-top

  t = config.data.max_seq_length
  lengths = [t] + [int(n) for n in np.random.default_rng(seed).integers(t // 2, t + 1, size=batch_size - 1)]
  return random_batch(config, lengths, seed)


def torch_images(images: np.ndarray):
  """(B, V, H, W, 3) numpy → (B, V, 3, H, W) torch."""
  import torch

  return torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous()


def torch_inputs(batch: Mapping[str, np.ndarray]):
  """The official collate: images (B, V, 3, H, W); targets (long) / masks cut to the batch's own length T_b;
  labels (B, C)."""
  import torch

  t_b = int(batch["masks"].sum(1).max())
  return (torch_images(batch["images"]),
          torch.from_numpy(batch["targets"][:, :t_b]).long(), torch.from_numpy(batch["masks"][:, :t_b]),
          torch.from_numpy(batch["labels"]))


def torch_model(config, images=None, *, seed: int = 0, eos_bias: float = 0.0):
  """Reference CAMANet with the spec §11.4 random init; BN running stats calibrated on ``images`` (B, V, 3, H, W)
  when given (sane eval-mode activations); ``eos_bias`` added to the EOS logit bias."""
  import torch
  from torch_reference import camanet as ref

  torch.manual_seed(seed)
  model = ref.CAMANet(config.model)
  ref.init_weights_(model)
  if images is not None:
    ref.calibrate_bn_(model, images)
  with torch.no_grad():
    model.encoder_decoder.logit.bias[0] += eos_bias
  return model


def to_flax(model, config):
  """(Flax module for ``config.model``, numpy ``{'params', 'batch_stats'}`` converted from the torch model)."""
  from rrg_jax import models

  system = models.get_system(config)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return system.module, system.torch_to_variables(sd, "torch reference")


# --- XLA introspection ------------------------------------------------------------------------------------------

def xla_flops(compiled) -> float:
  """FLOPs of a compiled executable from XLA's cost analysis (NaN when unavailable). Loop bodies (``scan``,
  ``while_loop``) are counted once, not per iteration."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return float("nan")
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


def xla_temp_mib(compiled) -> float:
  """XLA's temporary-buffer size of a compiled executable (activations, gradients, workspace) in MiB."""
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # noqa: BLE001
    return float("nan")


def saved_residual_mib(loss: Callable[..., object], *args) -> float:
  """MiB of the arrays ``jax.vjp(loss, *args)`` keeps for the backward pass: the program's activation memory as
  JAX hands it to XLA (before XLA's fusion and buffer assignment). Shapes only; nothing is computed."""
  import jax

  res = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(loss, *a)[1]), *args)
  return sum(r.size * r.dtype.itemsize for r in res) / 2**20


def device_peak_mib() -> float:
  """Accelerator peak bytes in use (GPU/TPU ``memory_stats``) in MiB; NaN on CPU."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else float("nan")


# --- timing ----------------------------------------------------------------------------------------------------

def interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, list[float]]:
  """Calls every ``fn`` ``warmup`` times, then ``repeats`` rounds of one timed call each, alternating between the
  fns so that machine noise hits all of them alike. Each fn must block until its result is ready.
  Returns seconds per call, ``{name: [repeats]}``."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  """(fn(), seconds)."""
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


# --- child processes and output ---------------------------------------------------------------------------------

def run_child(script: str, argv: Sequence[str]) -> dict:
  """Runs ``python script *argv`` and returns the JSON object it prints on its last stdout line."""
  proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"child {' '.join(argv)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1])


def fmt(x: float, digits: int = 1) -> str:
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
  line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
  return "\n".join([line(headers), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                    *(line(r) for r in rows)])


def describe_machine() -> str:
  """One line: JAX backend and devices, CPU threads, library versions."""
  import jax

  parts = [f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind})",
           f"cpus {len(os.sched_getaffinity(0))}"]
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    parts.append(f"torch {torch.__version__} (cpu, {torch.get_num_threads()} threads)")
  return ", ".join(parts)


# --- command line ----------------------------------------------------------------------------------------------

def base_parser(description: str, batch_sizes: str) -> argparse.ArgumentParser:
  """The options both JAX-vs-torch benchmarks take: configs, batch sizes, repeats, warm-up, threads, --quick."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--configs", default="iu_xray,mimic_cxr")
  parser.add_argument("--batch-sizes", default=batch_sizes)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=None, help="CPUs for both sides (default: all available)")
  parser.add_argument("--quick", action="store_true", help="iu_xray, batch 2, 1 warm-up, 2 repeats")
  return parser


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
  """``parser.parse_args()`` with ``--quick`` applied."""
  args = parser.parse_args()
  if args.quick:
    args.configs, args.batch_sizes, args.warmup, args.repeats = "iu_xray", "2", 1, 2
  return args
