r"""Beam-3 report generation, rrg_jax vs the PyTorch reference, on the same weights and images.

    python benchmarks/decode.py [--configs iu_xray,mimic_cxr] [--batch-sizes 2,16] [--repeats 5] [--warmup 2]
        [--threads N] [--eos-bias -30] [--matmul-precision highest] [--quick]
    python benchmarks/decode.py --hf [--hf-models bart,gpt2] [--hf-size real|tiny] [--hf-free-eos] [--batch-sizes 2,16]
        [--repeats 5] [--warmup 2] [--threads N] [--quick]

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

``--hf``: HF-semantics generation instead of the CAMANet rows — beam 4, 60 new tokens, ``rrg_jax.decoding.
hf_beam_search`` (KV cache, one jitted while_loop, encoder included) against ``transformers`` ``generate`` (5.23,
default attention) on the same random weights (HF init, converted in memory with ``rrg_jax.hf_weights``):
bart-base with RadGen's settings (encoder over 49 tokens, decoder start 2, early stopping, α = 1, no-repeat-3,
forced BOS 0 / EOS 2) and gpt2-medium with CT-AGRG's (prompt = BOS, early_stopping False, α = 1);
``--hf-size tiny`` swaps in 2-layer models of width 64 (a smoke test). Random weights would stop at arbitrary
steps, so by default ``min_length`` = ``max_length`` keeps EOS out until the end: every beam runs the full 60
tokens (``--hf-free-eos`` lets the models stop). Output rows as below, then ``ratio jax/torch hf_<model> b<batch>:
<x.xx>`` (torch time / JAX time). A third row, "jax bare steps", runs the same encoder and the same 60 cached decoder
steps on the B·K beam rows without any search (no scores, selection or cache reorder): the floor of the model
itself, printed as ``ceiling jax/torch ...`` = torch time / that floor — the ratio a search costing nothing would
reach.

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


def jax_decoders(model, variables, images: np.ndarray, max_len: int,
                 names: tuple[str, ...] = (*JAX_DECODERS, "encode")) -> dict:
  """{name: (run() → {'tokens' (B, max_len), 'steps'}, compile s)} for the three JAX decoders, plus 'encode'
  (only those in ``names`` are compiled)."""
  import jax
  from rrg_jax import decoding

  variables, images = jax.device_put((variables, images))

  def no_early_exit(variables, images, *, max_len):
    enc = model.apply(variables, images, method="encode")
    step_fn, state = decoding.encoder_decoder_step_fns(model, variables, enc["memory"], max_len, cached=True)
    dec = decoding.beam_search(step_fn, state, images.shape[0], beam_size=BEAM, max_len=max_len, early_exit=False)
    return {"tokens": dec.tokens, "steps": dec.steps}

  def beam(variables, inputs, *, cached):
    return decoding.encode_and_decode(model, variables, inputs, method="beam", beam_size=BEAM, max_len=max_len,
                                      cached=cached)

  # name → (jitted function, its arguments); encode_and_decode takes the encoder inputs as a tuple.
  programs = {
      "jax cached": (jax.jit(functools.partial(beam, cached=True)), (variables, (images,))),
      "jax cached, no early exit": (jax.jit(functools.partial(no_early_exit, max_len=max_len)), (variables, images)),
      "jax full prefix": (jax.jit(functools.partial(beam, cached=False)), (variables, (images,))),
      "encode": (jax.jit(lambda v, x: model.apply(v, x, method="encode")["memory"]), (variables, images))}
  out = {}
  for name, (fn, args) in programs.items():
    if name not in names:
      continue
    compiled, seconds = C.timed(lambda: fn.lower(*args).compile())
    out[name] = (functools.partial(_call, compiled, *args), seconds)
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
  parser.add_argument("--hf", action="store_true", help="HF-semantics BART / GPT-2 rows instead of CAMANet")
  parser.add_argument("--hf-models", default="bart,gpt2", help="with --hf: bart (bart-base), gpt2 (gpt2-medium)")
  parser.add_argument("--hf-size", default="real", choices=("real", "tiny"), help="with --hf: model sizes")
  parser.add_argument("--hf-free-eos", action="store_true", help="with --hf: no min_length, EOS may end beams")
  args = C.parse_args(parser)
  if args.hf:
    hf_main(args)
    return

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



# --- HF-semantics BART / GPT-2 (--hf) ---------------------------------------------------------------------------

HF_BEAM, HF_NEW_TOKENS, HF_SOURCE_LEN = 4, 60, 49
# (model, size) → (label, transformers config kwargs): bart-base / gpt2-medium architectures, or tiny ones.
HF_CONFIGS = {
    ("bart", "real"): ("bart-base", dict(
        vocab_size=50265, max_position_embeddings=1024, d_model=768, encoder_layers=6, decoder_layers=6,
        encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
    ("bart", "tiny"): ("bart-tiny", dict(
        vocab_size=1000, max_position_embeddings=128, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
    ("gpt2", "real"): ("gpt2-medium", dict(
        vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16, bos_token_id=50256,
        eos_token_id=50256)),
    ("gpt2", "tiny"): ("gpt2-tiny", dict(
        vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=999, eos_token_id=999)),
}


def hf_setup(name: str, size: str, b: int, free_eos: bool) -> dict:
  """Random-weight HF model (eval, default attention), the same weights as Flax variables, the inputs and the
  generation settings: RadGen's for BART (radgen_spec §3.5), CT-AGRG's for GPT-2 (ct_agrg_spec §7)."""
  import torch
  import transformers
  from rrg_jax import hf_weights
  from rrg_jax.layers.bart import BartConfig, BartForConditionalGeneration
  from rrg_jax.layers.gpt2 import GPT2Config, GPT2LMHeadModel

  label, config = HF_CONFIGS[(name, size)]
  torch.manual_seed(0)
  rng = np.random.RandomState(1)
  if name == "bart":
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(**config)).eval()
    module = BartForConditionalGeneration(BartConfig.from_hf_config(model.config.to_dict()))
    variables = hf_weights.bart_variables({k: v.numpy() for k, v in model.state_dict().items()}, module, label)
    ids = rng.randint(3, config["vocab_size"], (b, HF_SOURCE_LEN))
    settings = dict(eos_token_id=2, pad_token_id=1, early_stopping=True, length_penalty=1.0,
                    no_repeat_ngram_size=3, forced_bos_token_id=0, forced_eos_token_id=2)
    prompt_len, extra = 1, dict(bos_token_id=0, decoder_start_token_id=2)
  else:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    module = GPT2LMHeadModel(GPT2Config.from_hf_config(model.config.to_dict()))
    variables = hf_weights.gpt2_variables({k: v.numpy() for k, v in model.state_dict().items()}, module, label)
    eos = config["eos_token_id"]
    ids = np.full((b, 1), config["bos_token_id"])
    settings = dict(eos_token_id=eos, pad_token_id=eos, early_stopping=False, length_penalty=1.0,
                    no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None)
    prompt_len, extra = 1, dict(bos_token_id=config["bos_token_id"])
  max_length = prompt_len + HF_NEW_TOKENS
  settings["min_length"] = 0 if free_eos else max_length
  model.generation_config = transformers.GenerationConfig()  # no hidden defaults
  generation_config = transformers.GenerationConfig(
      max_length=max_length, do_sample=False, num_beams=HF_BEAM, num_return_sequences=1, repetition_penalty=1.0,
      use_cache=True, **settings, **extra)
  return dict(label=label, model=model, module=module, variables=variables, ids=ids.astype(np.int64),
              mask=np.ones(ids.shape, np.int64), settings=settings, max_length=max_length, prompt_len=prompt_len,
              generation_config=generation_config)


def hf_jax_decoder(name: str, setup: dict):
  """(run() → {'tokens', 'lengths', 'steps'}, compile s): encoder (BART) + cached HF beam search, AOT-compiled."""
  import jax
  from rrg_jax import decoding

  module, settings, max_length = setup["module"], setup["settings"], setup["max_length"]

  @jax.jit
  def run(variables, ids, mask):
    if name == "bart":
      enc = module.apply(variables, ids, mask, method="encode")
      step_fn, state = decoding.bart_step_fns(module, variables, enc, mask, max_length)
      start = dict(start_token_id=2)
    else:
      step_fn, state = decoding.gpt2_step_fns(module, variables, ids, mask, max_length)
      start = dict(prompt=ids)
    dec = decoding.hf_beam_search(step_fn, state, ids.shape[0], num_beams=HF_BEAM, max_length=max_length,
                                  **start, **settings)
    return {"tokens": dec.tokens, "lengths": dec.lengths, "steps": dec.steps}

  args = jax.device_put((setup["variables"], setup["ids"].astype(np.int32), setup["mask"].astype(np.int32)))
  compiled, seconds = C.timed(lambda: run.lower(*args).compile())
  return functools.partial(_call, compiled, *args), seconds


def hf_jax_bare_steps(name: str, setup: dict):
  """The floor under ``hf_jax_decoder``: the same encoder (BART) and the same number of cached decoder steps on the
  B·K beam rows, without the search (no scores, selection or cache reorder). AOT-compiled run()."""
  import jax
  import jax.numpy as jnp
  from rrg_jax import decoding

  module, max_length = setup["module"], setup["max_length"]

  @jax.jit
  def run(variables, ids, mask):
    if name == "bart":
      enc = module.apply(variables, ids, mask, method="encode")
      step_fn, state = decoding.bart_step_fns(module, variables, enc, mask, max_length)
    else:
      step_fn, state = decoding.gpt2_step_fns(module, variables, ids, mask, max_length)
    state = jax.tree.map(lambda x: jnp.repeat(x, HF_BEAM, axis=0), state)
    tokens = jnp.zeros((ids.shape[0] * HF_BEAM,), jnp.int32)

    def body(_, carry):
      state, acc = carry
      logits, state = step_fn(state, tokens)
      return state, acc + logits[:, 0]

    return jax.lax.fori_loop(0, HF_NEW_TOKENS, body, (state, jnp.zeros(tokens.shape)))[1]

  args = jax.device_put((setup["variables"], setup["ids"].astype(np.int32), setup["mask"].astype(np.int32)))
  return functools.partial(_call, run.lower(*args).compile(), *args)


def hf_torch_decoder(setup: dict):
  """run() → sequences (B, T) of ``model.generate`` with the explicit GenerationConfig."""
  import torch

  ids, mask = torch.as_tensor(setup["ids"]), torch.as_tensor(setup["mask"])

  def run():
    with torch.no_grad():
      return setup["model"].generate(ids, attention_mask=mask, generation_config=setup["generation_config"])

  return run


def hf_time_one(name: str, b: int, args) -> dict:
  setup = hf_setup(name, args.hf_size, b, args.hf_free_eos)
  jax_run, compile_s = hf_jax_decoder(name, setup)
  outputs = {}
  fns = {"jax cached": functools.partial(_store, outputs, "jax cached", jax_run),
         "torch generate": functools.partial(_store, outputs, "torch generate", hf_torch_decoder(setup)),
         "jax bare steps": hf_jax_bare_steps(name, setup)}
  times = C.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
  pl, pad = setup["prompt_len"], setup["settings"]["pad_token_id"]
  got, lengths = np.asarray(outputs["jax cached"]["tokens"]), np.asarray(outputs["jax cached"]["lengths"])
  want = outputs["torch generate"].numpy()
  same = bool(np.array_equal(got[:, :want.shape[1]], want) and np.all(got[:, want.shape[1]:] == pad)
              and lengths.max() == want.shape[1])
  rows_jax = [[int(t) for t in row[pl:n]] for row, n in zip(got, lengths)]
  rows_torch = [[int(t) for t in row[pl:]] for row in want]
  rows_torch = [r[:n - pl] for r, n in zip(rows_torch, lengths)] if same else rows_torch
  return dict(label=setup["label"], times={k: C.median(v) for k, v in times.items()}, same=same,
              agreement="True" if same else agreement(rows_jax, rows_torch),
              mean_new=float(np.mean(lengths - pl)), steps=int(outputs["jax cached"]["steps"]),
              torch_steps=want.shape[1] - pl, compile_s=compile_s)


def hf_main(args) -> None:
  import jax
  import torch  # noqa: F401  (limit_cpus sets its threads)
  import transformers

  if args.matmul_precision:
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  threads = C.limit_cpus(args.threads)
  print(C.describe_machine(), f"| HF generate: beam {HF_BEAM}, {HF_NEW_TOKENS} new tokens, "
        f"{'EOS free' if args.hf_free_eos else 'min_length = max_length'}, transformers {transformers.__version__}, "
        f"threads {threads}", flush=True)
  rows, ratios, floors, identical = [], [], [], True
  for name in args.hf_models.split(","):
    for b in [int(x) for x in args.batch_sizes.split(",")]:
      r = hf_time_one(name, b, args)
      t, tag = r["times"], f"{r['label']} b{b}"
      identical &= r["same"]
      for dec in ("jax cached", "torch generate", "jax bare steps"):
        sec = t[dec]
        jax_row = dec == "jax cached"
        rows.append([r["label"], str(b), dec, C.fmt(1e3 * sec), C.fmt(1e3 * sec / b), C.fmt(b / sec, 2),
                     C.fmt(r["mean_new"], 1) if dec != "jax bare steps" else "-",
                     str(r["steps"] if jax_row else r["torch_steps"] if dec == "torch generate" else HF_NEW_TOKENS),
                     C.fmt(r["compile_s"]) if jax_row else "-", r["agreement"] if jax_row else "-"])
      ratios.append((f"decode_hf {tag}", t["torch generate"] / t["jax cached"]))
      floors.append((f"decode_hf {tag}", t["torch generate"] / t["jax bare steps"]))
      print(f"  done {tag}: jax cached {1e3 * t['jax cached']:.0f} ms, torch {1e3 * t['torch generate']:.0f} ms, "
            f"identical {r['same']}", file=sys.stderr, flush=True)
      gc.collect()
  print(C.markdown_table(["model", "batch", "decoder", "ms/batch", "ms/report", "reports/s", "mean new tokens",
                          "steps", "compile s", "tokens = torch"], rows))
  print(f"identical tokens: {identical}")
  for name, x in ratios:
    print(f"ratio jax/torch {name}: {x:.2f}")
  for name, x in floors:  # the ratio a search with no cost of its own would reach
    print(f"ceiling jax/torch {name} (torch / jax bare steps): {x:.2f}")


if __name__ == "__main__":
  main()
