r"""Beam-3 report generation, rrg_jax vs the PyTorch reference, on the same weights and images.

    python benchmarks/decode.py [--configs iu_xray,mimic_cxr] [--batch-sizes 2,16] [--repeats 5] [--warmup 2]
        [--threads N] [--eos-bias -30] [--matmul-precision highest] [--quick]

Each call generates reports of up to ``max_seq_length`` tokens (60 IU X-Ray, 100 MIMIC-CXR) for a batch of images,
encoder (DenseNet + FBL + transformer encoder, eval mode) included:

* JAX cached: ``rrg_jax.decoding.encode_and_decode`` (what ``System.generate`` jits), beam 3, KV /
  relational-memory cache (``encoder_decoder_step_fns(cached=True)``), batched over images, AOT-compiled (timed as
  "compile").
* JAX cached, no early exit (information): the same search with ``beam_search(early_exit=False)``.
* JAX full prefix (information): ``cached=False``, the decoder re-run over the whole ``max_len`` prefix buffer.
* torch: ``tests/torch_reference`` ``beam_search``, the original algorithm: the decoder (and the relational
  memory, token by token) re-run over the growing prefix every step, always ``max_len`` steps.

The algorithmic differences measured are therefore (a) cached incremental vs full-prefix decoding and (b) the JAX
early exit once no later hypothesis can win (see ``rrg_jax.decoding``), which the original lacks; the "no early
exit" row separates the two. Random weights emit EOS early or never, so ``--eos-bias`` (added to the EOS logit
bias; default −30: EOS never wins, every beam runs the full length, so (b) plays no part) sets the lengths;
positive values shorten the reports, and the "steps" column shows whether the JAX early exit triggered. The mean
generated length (tokens before the first EOS) is reported, and the JAX tokens are checked against torch: "True",
or how many reports agree and the first token where one differs. The parity tests show they are equal for the
same weights; with random weights the beams' scores can tie to float32 rounding late in a long report (MIMIC
batch 16: one image of 16 differs from token 97 of 100 on, where torch in float64 agrees with JAX), while a
difference in the first tokens means a broken set-up. On a GPU, where float32 matmuls may use TF32 by default,
pass ``--matmul-precision highest``.

Weights: the reference's random init (spec §11.4), BN running statistics calibrated on the images, converted with
``rrg_jax.convert``. Both sides get the same ``--threads`` CPUs. Timing: ``--warmup`` untimed calls per decoder,
then ``--repeats`` rounds alternating one blocking call of each decoder; medians. "encode ms" is the encoder alone
(JAX jitted ``model.encode``; torch ``model.encode`` under ``no_grad``). Output: a markdown table, then
``ratio jax/torch decode <config> b<batch>: <x.xx>`` (torch time / JAX cached time; higher = JAX faster).
"""

from __future__ import annotations

import functools
import gc
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from benchmarks import _common as C  # noqa: E402

BEAM = 3
JAX_DECODERS = ("jax cached", "jax cached, no early exit", "jax full prefix")


def jax_decoders(model, variables, images: np.ndarray, max_len: int) -> dict:
  """{name: (run() → {'tokens' (B, max_len), 'steps'}, compile s)} for the three JAX decoders, plus 'encode'."""
  import jax
  from rrg_jax import decoding

  variables, images = jax.device_put((variables, images))

  @functools.partial(jax.jit, static_argnames=("max_len",))
  def no_early_exit(variables, images, *, max_len):
    enc = model.apply(variables, images, method="encode")
    step_fn, state = decoding.encoder_decoder_step_fns(model, variables, enc["memory"], max_len, cached=True)
    dec = decoding.beam_search(step_fn, state, images.shape[0], beam_size=BEAM, max_len=max_len, early_exit=False)
    return {"tokens": dec.tokens, "steps": dec.steps}

  lowered = {
      "jax cached": lambda: decoding.encode_and_decode.lower(model, variables, images, method="beam",
                                                             beam_size=BEAM, max_len=max_len, cached=True),
      "jax cached, no early exit": lambda: no_early_exit.lower(variables, images, max_len=max_len),
      "jax full prefix": lambda: decoding.encode_and_decode.lower(model, variables, images, method="beam",
                                                                  beam_size=BEAM, max_len=max_len, cached=False),
      "encode": lambda: jax.jit(lambda v, x: model.apply(v, x, method="encode")["memory"]).lower(variables, images)}
  out = {}
  for name, lower in lowered.items():
    compiled, seconds = C.timed(lambda: lower().compile())
    out[name] = (functools.partial(_call, compiled, variables, images), seconds)
  return out


def _call(compiled, *args):
  import jax

  return jax.block_until_ready(compiled(*args))


def _store(outputs: dict, name: str, fn) -> None:
  outputs[name] = fn()


def torch_decoders(tmodel, images, max_len: int) -> dict:
  """{'torch': run() → token lists, 'encode': run()} of the reference model in eval mode."""
  import torch
  from torch_reference import camanet as ref

  tmodel.eval()

  def encode():
    with torch.no_grad():
      return tmodel.encode(images)["henc"]

  return {"torch": lambda: ref.beam_search(tmodel, images, max_len, beam_size=BEAM), "encode": encode}


def time_one(preset: str, b: int, args) -> dict:
  """Interleaved timings and outputs of one (config, batch)."""
  config = C.full_config(preset)
  max_len = config.data.max_seq_length
  images = C.make_batch(config, b, seed=1)["images"]
  timages = C.torch_images(images)
  tmodel = C.torch_model(config, timages, eos_bias=args.eos_bias)
  model, variables = C.to_flax(tmodel, config)
  jx = jax_decoders(model, variables, images, max_len)
  tx = torch_decoders(tmodel, timages, max_len)
  decoders = {"jax cached": jx["jax cached"][0], "torch": tx["torch"],
              **{name: jx[name][0] for name in JAX_DECODERS[1:]}}
  outputs = {}
  fns = {name: functools.partial(_store, outputs, name, fn) for name, fn in decoders.items()}
  fns.update({"jax encode": jx["encode"][0], "torch encode": tx["encode"]})
  times = C.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
  tokens = {name: [[int(t) for t in row] for row in np.asarray(outputs[name]["tokens"])] for name in JAX_DECODERS}
  for name in JAX_DECODERS:
    tokens[name] = [r[:r.index(0)] if 0 in r else r for r in tokens[name]]
  tokens["torch"] = outputs["torch"]
  return dict(times={k: C.median(v) for k, v in times.items()}, tokens=tokens,
              steps={n: int(outputs[n]["steps"]) for n in JAX_DECODERS} | {"torch": max_len},
              compile_s={n: jx[n][1] for n in JAX_DECODERS})


def agreement(got: list[list[int]], want: list[list[int]]) -> str:
  """"True" when every report is identical, else "n/B same, first diff at token t" (t: earliest position where
  any report differs, counted from 0)."""
  if got == want:
    return "True"
  firsts = [next((t for t, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            for g, w in zip(got, want) if g != w]
  return f"{len(got) - len(firsts)}/{len(got)} same, first diff at token {min(firsts)}"


def main() -> None:
  parser = C.base_parser(__doc__.split("\n\n")[0], batch_sizes="2,16")
  parser.add_argument("--eos-bias", type=float, default=-30.0, help="added to the EOS logit bias")
  parser.add_argument("--matmul-precision", default=None, help="jax_default_matmul_precision, e.g. highest")
  args = C.parse_args(parser)

  import jax
  import torch  # noqa: F401  (limit_cpus sets its threads)

  if args.matmul_precision:
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)

  threads = C.limit_cpus(args.threads)
  print(C.describe_machine(), f"| beam {BEAM}, EOS bias {args.eos_bias:+g}, threads {threads}", flush=True)
  rows, ratios, identical = [], [], True
  for preset in args.configs.split(","):
    for b in [int(x) for x in args.batch_sizes.split(",")]:
      r = time_one(preset, b, args)
      t, tok, tag = r["times"], r["tokens"], f"{preset} b{b}"
      same = tok["jax cached"] == tok["torch"]
      identical &= same
      for name in ("jax cached", "torch") + JAX_DECODERS[1:]:
        sec = t[name]
        enc = t["torch encode"] if name == "torch" else t["jax encode"]
        rows.append([preset, str(b), name, C.fmt(1e3 * sec), C.fmt(1e3 * sec / b), C.fmt(b / sec, 2),
                     C.fmt(1e3 * enc), C.fmt(float(np.mean([len(x) for x in tok[name]])), 1),
                     str(r["steps"][name]), C.fmt(r["compile_s"].get(name, float("nan"))),
                     "-" if name == "torch" else agreement(tok[name], tok["torch"])])
      ratios += [(f"decode {tag}", t["torch"] / t["jax cached"]),
                 (f"decode_no_early_exit {tag}", t["torch"] / t["jax cached, no early exit"]),
                 (f"decode_full_prefix {tag}", t["torch"] / t["jax full prefix"])]
      print(f"  done {tag}: jax cached {1e3 * t['jax cached']:.0f} ms, torch {1e3 * t['torch']:.0f} ms, "
            f"identical {same}", file=sys.stderr, flush=True)
      gc.collect()
  print(C.markdown_table(["config", "batch", "decoder", "ms/batch", "ms/report", "reports/s", "encode ms",
                          "mean length", "steps", "compile s", "tokens = torch"], rows))
  print(f"identical tokens: {identical}")
  for name, x in ratios:
    print(f"ratio jax/torch {name}: {x:.2f}")


if __name__ == "__main__":
  main()
