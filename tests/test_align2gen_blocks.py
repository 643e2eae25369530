"""Align2Gen (D2R-Net) visual and alignment blocks vs a torch reference written from align2gen_spec.md
(``torch_reference.align2gen``, official module names): CPCA, the global branch, SimpleConvNet, PPA, the lesion
branch (per-region BatchNorm: outputs, running statistics after one step, gradients; eval; the "batched" switch),
the full ``MultiTargetExtractor`` state_dict mapping; §16.1 parameter counts and §16.2 shapes (eval_shape);
§16.8 NAAF / ranking-loss vectors, masks, the LAB restriction and jit.

float32, highest matmul precision (tests/conftest.py). Weights go torch state_dict → ``convert.
state_dict_to_variables``; the only rename is the ResNet ``nn.Sequential`` index → torchvision name (as R2Gen's
``torch_key_renames``). Every comparison prints ``PARITY <name> ...`` (pytest -s).
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from numerics import check
from rrg_jax import convert
from rrg_jax.alignment import align, lesion
from torch_reference import align2gen as ref
from torch_reference import resnet as ref_resnet

TINY_RESNET = (8, 16, 32, 64)
TINY_SIMPLE = (4, 8, 8, 16, 16)
RTOL = 1e-5
GRAD_TOL = 1e-4
# The official VisualExtractor keeps the ResNet as nn.Sequential(children()[:-2]): 0 conv1, 1 bn1, 4–7 layer1–4.
RESNET_RENAMES = (
    (r"(^|\.)model\.([4-7])\.", lambda m: f"{m.group(1)}model.layer{int(m.group(2)) - 3}."),
    (r"(^|\.)model\.0\.", r"\1model.conv1."),
    (r"(^|\.)model\.1\.", r"\1model.bn1."),
)


# --- helpers --------------------------------------------------------------------------------------------------

def state_dict(module: torch.nn.Module, prefixes: tuple[str, ...] = ("",)) -> dict[str, np.ndarray]:
  """numpy state_dict of the keys under ``prefixes``, ResNet indices renamed."""
  out = {}
  for key, value in module.state_dict().items():
    if key.startswith(prefixes):
      for pattern, repl in RESNET_RENAMES:
        key = re.sub(pattern, repl, key)
      out[key] = value.detach().numpy()
  return out


def torch_grads(module: torch.nn.Module, params, prefixes: tuple[str, ...] = ("",)) -> dict:
  """The torch parameter gradients under ``prefixes`` as a Flax params tree shaped like ``params``."""
  grads = {}
  for key, p in module.named_parameters():
    if key.startswith(prefixes):
      for pattern, repl in RESNET_RENAMES:
        key = re.sub(pattern, repl, key)
      grads[key] = p.grad.numpy()
  return convert.state_dict_to_variables(grads, {"params": params})["params"]  # float64 grads rounded to float32


def to_variables(fmodule, init_args, sd) -> dict:
  expected = jax.eval_shape(lambda: fmodule.init(jax.random.key(0), *init_args))
  return convert.state_dict_to_variables(sd, expected)


def check_grads(name, got, want, exact=None, tol=GRAD_TOL, zero_tol=1e-6) -> float:
  """Per leaf ‖g_jax − g_torch‖ / ‖g_torch‖ ≤ tol (tests/test_bart.py's rule), or, where ``exact`` (torch float64
  gradients) is given and that bound fails, JAX's own error against float64 ≤ max(tol, 1.5× torch float32's)
  (the float32 noise floor of ``numerics.check``; the lesion branch's ``lga*`` leaves carry ~1e-5 of the gradient
  norm, what PPA's last BatchNorm leaves of a spatially constant branch, and are ill-conditioned). A leaf whose
  torch gradient is ≤ zero_tol·G (G = total torch gradient norm; conv biases before a BatchNorm, PPA's
  ``lga*/mlp1`` and ``lga*/norm/scale``: a LayerNorm on ⌊3/2⌋ = 1 feature outputs its bias) must have a JAX
  gradient ≤ zero_tol·G too."""
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_exact = dict(jax.tree_util.tree_leaves_with_path(exact)) if exact is not None else {}
  total = float(np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2) for w in flat_want.values())))
  worst, zeros, floor = 0.0, [], []
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  assert len(flat_got) == len(flat_want)
  for path, g in flat_got:
    g, w = np.asarray(g, np.float64), np.asarray(flat_want[path], np.float64)
    norm = np.linalg.norm(w)
    if norm <= zero_tol * total:
      zeros.append(np.linalg.norm(g) / total)
      assert zeros[-1] <= zero_tol, f"{name} {jax.tree_util.keystr(path)}: gradient not zero ({zeros[-1]:.3e} G)"
      continue
    err = np.linalg.norm(g - w) / norm
    worst = max(worst, err)
    if err > tol:
      assert path in flat_exact, f"{name} {jax.tree_util.keystr(path)}: relative gradient error {err:.3e}"
      e = np.asarray(flat_exact[path], np.float64)
      jax_err, torch_err = (np.linalg.norm(a - e) / np.linalg.norm(e) for a in (g, w))
      floor.append(f"{jax.tree_util.keystr(path)} jax {jax_err:.2e} / torch32 {torch_err:.2e} vs float64")
      assert jax_err <= max(tol, 1.5 * torch_err), f"{name} {jax.tree_util.keystr(path)}: error {err:.3e}; {floor[-1]}"
  print(f"PARITY {name}: max per-leaf relative gradient error {worst:.3e} over {len(flat_want)} leaves; "
        f"{len(zeros)} zero-gradient leaves, max |g_jax| {max(zeros, default=0.0):.1e} G"
        + (f"; float32 noise floor: {', '.join(floor)}" if floor else ""))
  return worst


def check_stats(name, got, want) -> float:
  """Every running-statistics leaf within RTOL (relative to its max); prints the worst one."""
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  assert len(flat_got) == len(flat_want) > 0
  errs = {}
  for path, g in flat_got:
    g, w = np.asarray(g, np.float64), np.asarray(flat_want[path], np.float64)
    errs[jax.tree_util.keystr(path)] = float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
  worst = max(errs, key=errs.get)
  print(f"PARITY {name}: {len(errs)} leaves, worst {worst} rel {errs[worst]:.3e}")
  assert errs[worst] <= RTOL, (name, worst, errs[worst])
  return errs[worst]


def nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.moveaxis(x, -3, -1))


def nchw(x) -> np.ndarray:
  return np.moveaxis(np.asarray(x), -1, -3)


def rand(seed: int, *shape: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def train_vjp(fmodule, variables, x, rest, cotangent):
  """Flax train step: (y, new batch_stats, (d params, d x)) for cotangent on y."""
  def f(params, x):
    y, state = fmodule.apply({"params": params, "batch_stats": variables.get("batch_stats", {})}, x, *rest,
                             mutable=["batch_stats"])
    return y, state.get("batch_stats", {})

  @jax.jit
  def run(params, x, g):
    y, vjp, stats = jax.vjp(f, params, x, has_aux=True)
    return y, stats, vjp(g)
  return run(variables["params"], x, cotangent)


def torch_vjp(tmodule, x: np.ndarray, fn, cotangent, dtype=torch.float32):
  """torch forward ``fn(tmodule, x)`` + backward of the cotangent(s) in ``dtype``; (outputs, input grad)."""
  xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
  out = fn(tmodule, xt)
  outs = out if isinstance(out, tuple) else (out,)
  cots = cotangent if isinstance(cotangent, tuple) else (cotangent,)
  torch.autograd.backward(outs, [torch.from_numpy(c).to(dtype) for c in cots])
  return tuple(o.detach().numpy() for o in outs), xt.grad.numpy()


def placeholder_regions(seed: int, b: int, m: int, s: int, empty: list[tuple[int, int]]) -> np.ndarray:
  regions = rand(seed, b, m, 3, s, s)
  for i, j in empty:
    regions[i, j] = np.float32(ref.PLACEHOLDER)
  return regions


# --- CPCA and the global branch -------------------------------------------------------------------------------

def test_cpca_forward_and_gradients_match_torch():
  torch.manual_seed(0)
  tmodel = ref.CPCA(16, 16)
  x = rand(1, 2, 16, 12, 12)
  fmodel = lesion.CPCA()
  variables = to_variables(fmodel, (nhwc(x),), state_dict(tmodel))
  g = rand(2, 2, 16, 12, 12)
  (want,), want_dx = torch_vjp(tmodel, x, lambda m, x: m(x), g)
  y, vjp = jax.vjp(lambda p, x: fmodel.apply({"params": p}, x), variables["params"], nhwc(x))
  dparams, dx = vjp(nhwc(g))
  check("cpca C=16 forward", y, nhwc(want), rtol=RTOL)
  check_grads("cpca C=16 grads", dparams, torch_grads(tmodel, variables["params"]))
  check_grads("cpca C=16 grad of input", {"x": dx}, {"x": nhwc(want_dx)})


def make_global_pair(seed: int):
  torch.manual_seed(seed)
  tmodel = ref.VisualExtractor(18, TINY_RESNET, embed_size=32)  # Bottlenecks: tests/test_resnet.py
  gen = torch.Generator().manual_seed(seed)
  ref_resnet.randomize_norms_(tmodel, gen)
  ref_resnet.scale_residual_bns_(tmodel, 0.3)
  fmodel = lesion.GlobalVisualBranch(18, TINY_RESNET, embed_size=32)
  x = rand(seed, 2, 3, 64, 64)
  variables = to_variables(fmodel, (nhwc(x), False), state_dict(tmodel))
  return tmodel, fmodel, variables, x


def test_global_visual_branch_train_stats_gradients_and_eval_match_torch():
  tmodel, fmodel, variables, x = make_global_pair(3)
  tmodel.train()
  cot = (rand(4, 2, 4, 32), rand(5, 2, 32))
  (want_patch, want_avg), want_dx = torch_vjp(tmodel, x, lambda m, x: m(x), cot)
  (patch, avg), stats, (dparams, dx) = train_vjp(fmodel, variables, nhwc(x), (True,),
                                                 tuple(jnp.asarray(c) for c in cot))
  assert patch.shape == (2, 4, 32) and avg.shape == (2, 32)
  check("global branch tiny train patch_feats", patch, want_patch, rtol=RTOL)
  check("global branch tiny train avg_feats", avg, want_avg, rtol=RTOL)
  after = convert.state_dict_to_variables(state_dict(tmodel), variables)
  check_stats("global branch tiny running stats", stats, after["batch_stats"])
  check_grads("global branch tiny grads", dparams, torch_grads(tmodel, variables["params"]))
  check_grads("global branch tiny grad of images", {"x": dx}, {"x": nhwc(want_dx)})

  tmodel.eval()
  with torch.no_grad():
    want_patch, want_avg = tmodel(torch.from_numpy(x))
  patch, avg = jax.jit(lambda v, x: fmodel.apply(v, x, False))(after, nhwc(x))
  check("global branch tiny eval patch_feats", patch, want_patch.numpy(), rtol=RTOL)
  check("global branch tiny eval avg_feats", avg, want_avg.numpy(), rtol=RTOL)


# --- SimpleConvNet and PPA ------------------------------------------------------------------------------------

def test_simple_conv_net_train_stats_gradients_and_eval_match_torch():
  torch.manual_seed(6)
  tmodel = ref.SimpleConvNet(TINY_SIMPLE)
  ref_resnet.randomize_norms_(tmodel, torch.Generator().manual_seed(6))
  fmodel = lesion.SimpleConvNet(TINY_SIMPLE)
  x = rand(7, 3, 3, 52, 52)  # VALID 3×3: 52 → 50 → 24 → 11 → 5 → 2
  variables = to_variables(fmodel, (nhwc(x), False), state_dict(tmodel))
  cot = rand(8, 3, 16)
  tmodel.train()
  (want,), want_dx = torch_vjp(tmodel, x, lambda m, x: m(x), cot)
  y, stats, (dparams, dx) = train_vjp(fmodel, variables, nhwc(x), (True,), jnp.asarray(cot))
  check("simple convnet tiny train forward", y, want, rtol=RTOL)
  after = convert.state_dict_to_variables(state_dict(tmodel), variables)
  check_stats("simple convnet tiny running stats", stats, after["batch_stats"])
  check_grads("simple convnet tiny grads", dparams, torch_grads(tmodel, variables["params"]))
  check_grads("simple convnet tiny grad of input", {"x": dx}, {"x": nhwc(want_dx)})
  tmodel.eval()
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x)).numpy()
  check("simple convnet tiny eval forward", fmodel.apply(after, nhwc(x), False), want, rtol=RTOL)


@pytest.mark.parametrize("size", [16, 18])  # 18: the tiles drop the last 2 rows/cols, the resize is not integer
def test_ppa_train_stats_gradients_and_eval_match_torch(size):
  torch.manual_seed(size)
  tmodel = ref.PPA(3, 3, dropout=0.0)
  ref.randomize_(tmodel, torch.Generator().manual_seed(size))
  fmodel = lesion.PPA(3, dropout_rate=0.0)
  x = rand(size + 1, 2, 3, size, size)
  variables = to_variables(fmodel, (nhwc(x), False), state_dict(tmodel))
  cot = rand(size + 2, 2, 3, size, size)
  tmodel.train()
  (want,), want_dx = torch_vjp(tmodel, x, lambda m, x: m(x), cot)
  y, stats, (dparams, dx) = train_vjp(fmodel, variables, nhwc(x), (True,), nhwc(cot))
  check(f"ppa {size}² train forward", y, nhwc(want), rtol=RTOL)
  after = convert.state_dict_to_variables(state_dict(tmodel), variables)
  check_stats(f"ppa {size}² running stats", stats, after["batch_stats"])
  check_grads(f"ppa {size}² grads", dparams, torch_grads(tmodel, variables["params"]))
  check_grads(f"ppa {size}² grad of input", {"x": dx}, {"x": nhwc(want_dx)})
  for p in ("lga2", "lga4"):  # the f = 3 degeneracy (§4.2): exactly no gradient through the 1-feature LayerNorm
    assert not np.any(dparams[p]["mlp1"]["kernel"]) and not np.any(dparams[p]["norm"]["scale"])
  tmodel.eval()
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x)).numpy()
  check(f"ppa {size}² eval forward", fmodel.apply(after, nhwc(x), False), nhwc(want), rtol=RTOL)


@pytest.mark.parametrize("h,w,out", [(3, 5, (6, 10)), (2, 3, (8, 12)), (4, 4, (18, 18))])
def test_bilinear_resize_matches_torch_align_corners_false(h, w, out):
  x = rand(9, 2, 3, h, w)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), size=out, mode="bilinear", align_corners=False)
  got = jax.image.resize(nhwc(x), (2, *out, 3), "bilinear")
  check(f"bilinear resize {h}x{w} → {out}", got, nhwc(want.numpy()), atol=1e-6)


# --- the lesion branch ----------------------------------------------------------------------------------------

def make_lesion_pair(seed: int, lera: str, simple=TINY_SIMPLE, region_bn: str = "per_region"):
  torch.manual_seed(seed)
  tmodel = ref.MultiTargetExtractor(18, TINY_RESNET, simple, lera=lera, lera_dropout=0.0)
  ref.randomize_(tmodel, torch.Generator().manual_seed(seed))
  fmodel = lesion.LesionBranch(simple, lera=lera, lera_dropout=0.0, region_bn=region_bn)
  return tmodel, fmodel


LESION_PREFIXES = ("simple.", "region_visual_extractor.")
EMPTY = [(0, 1), (1, 2)]


@pytest.mark.parametrize("lera", ["ppa", "identity"])
def test_lesion_branch_per_region_train_matches_torch_loop(lera):
  tmodel, fmodel = make_lesion_pair(10, lera)
  regions = placeholder_regions(11, 2, 3, 52, EMPTY)
  valid = np.ones((2, 3), bool)
  for i, j in EMPTY:
    valid[i, j] = False
  np.testing.assert_array_equal(lesion.region_valid(nhwc(regions)), valid)
  variables = to_variables(fmodel, (nhwc(regions), jnp.asarray(valid), False), state_dict(tmodel, LESION_PREFIXES))
  cot = rand(12, 2, 3, 16)
  tmodel.train()
  exact_model = copy.deepcopy(tmodel).double()
  _, exact_dx = torch_vjp(exact_model, regions, lambda m, x: m.region_features(x), cot, torch.float64)
  (want,), want_dx = torch_vjp(tmodel, regions, lambda m, x: m.region_features(x), cot)
  y, stats, (dparams, dx) = train_vjp(fmodel, variables, nhwc(regions), (jnp.asarray(valid), True),
                                      jnp.asarray(cot))
  np.testing.assert_array_equal(np.asarray(y)[~valid], np.float32(1e-8))
  check(f"lesion branch ({lera}) per-region train forward", y, want, rtol=RTOL)
  after = convert.state_dict_to_variables(state_dict(tmodel, LESION_PREFIXES), variables)
  check_stats(f"lesion branch ({lera}) running stats after 4 region updates", stats, after["batch_stats"])
  check_grads(f"lesion branch ({lera}) grads", dparams, torch_grads(tmodel, variables["params"], LESION_PREFIXES),
              torch_grads(exact_model, variables["params"], LESION_PREFIXES))
  check_grads(f"lesion branch ({lera}) grad of regions", {"x": dx}, {"x": nhwc(want_dx)}, {"x": nhwc(exact_dx)})
  assert not np.any(np.asarray(dx)[~valid])

  tmodel.eval()
  with torch.no_grad():
    want = tmodel.region_features(torch.from_numpy(regions)).numpy()
  got = jax.jit(lambda v, r: fmodel.apply(v, r, jnp.asarray(valid), False))(after, nhwc(regions))
  check(f"lesion branch ({lera}) eval forward", got, want, rtol=RTOL)


def test_lesion_branch_batched_is_one_batchnorm_over_the_valid_regions():
  tmodel, fmodel = make_lesion_pair(13, "ppa", region_bn="batched")
  regions = placeholder_regions(14, 2, 3, 52, EMPTY)
  valid = np.asarray(lesion.region_valid(nhwc(regions)))
  variables = to_variables(fmodel, (nhwc(regions), jnp.asarray(valid), False), state_dict(tmodel, LESION_PREFIXES))
  tmodel.train()
  with torch.no_grad():  # the corrected semantics: the valid crops as one batch
    batch = torch.from_numpy(regions[valid])
    want = tmodel.simple(tmodel.region_visual_extractor(batch)).numpy()
  y, state = jax.jit(lambda v, r: fmodel.apply(v, r, jnp.asarray(valid), True, mutable=["batch_stats"]))(
      variables, nhwc(regions))
  check("lesion branch batched-BN train forward (valid slots)", np.asarray(y)[valid], want, rtol=RTOL)
  np.testing.assert_array_equal(np.asarray(y)[~valid], np.float32(1e-8))
  after = convert.state_dict_to_variables(state_dict(tmodel, LESION_PREFIXES), variables)
  check_stats("lesion branch batched-BN running stats (one update)", state["batch_stats"], after["batch_stats"])


def test_multi_target_extractor_maps_the_official_state_dict_and_matches_eval():
  tmodel, _ = make_lesion_pair(15, "ppa")
  ref_resnet.scale_residual_bns_(tmodel, 0.3)
  fmodel = lesion.MultiTargetExtractor(TINY_SIMPLE, depth=18, resnet_widths=TINY_RESNET)
  images, regions = rand(16, 2, 3, 64, 64), placeholder_regions(17, 2, 3, 52, EMPTY)
  valid = lesion.region_valid(nhwc(regions))
  sd = state_dict(tmodel)
  assert len([k for k in tmodel.state_dict() if k.startswith("visual_extractor.cpca.")]) == 20
  variables = to_variables(fmodel, (nhwc(images), nhwc(regions), valid, False), sd)  # no missing / unexpected
  tmodel.eval()
  with torch.no_grad():
    want = tmodel(torch.from_numpy(images), torch.from_numpy(regions))
  got = jax.jit(lambda v, x, r: fmodel.apply(v, x, r, valid, False))(variables, nhwc(images), nhwc(regions))
  for name, g, w in zip(("region_feats", "avg_feats", "patch_feats"), got, want):
    check(f"multi-target extractor tiny eval {name}", g, w.numpy(), rtol=RTOL)


@pytest.mark.slow
def test_real_size_lesion_branch_per_region_train_matches_torch_loop():
  """Full widths, 384² crops, PPA: one valid box and one placeholder; outputs and every running statistic."""
  torch.manual_seed(20)
  tsimple, tppa = ref.SimpleConvNet(), ref.PPA(3, 3, dropout=0.0)
  tmodel = torch.nn.Module()
  tmodel.simple, tmodel.region_visual_extractor = tsimple, tppa
  ref.randomize_(tmodel, torch.Generator().manual_seed(20))
  regions = placeholder_regions(21, 1, 2, 384, [(0, 1)])
  valid = np.array([[True, False]])
  fmodel = lesion.LesionBranch(lera_dropout=0.0)
  variables = to_variables(fmodel, (nhwc(regions), jnp.asarray(valid), False), state_dict(tmodel))
  tmodel.train()
  with torch.no_grad():
    want = tsimple(tppa(torch.from_numpy(regions[0, :1]))).numpy()
  y, state = jax.jit(lambda v, r: fmodel.apply(v, r, jnp.asarray(valid), True, mutable=["batch_stats"]))(
      variables, nhwc(regions))
  assert y.shape == (1, 2, 1024)
  check("lesion branch 384² per-region train forward", y[0, :1], want, rtol=RTOL)
  np.testing.assert_array_equal(np.asarray(y)[0, 1], np.float32(1e-8))
  after = convert.state_dict_to_variables(state_dict(tmodel), variables)
  check_stats("lesion branch 384² running stats", state["batch_stats"], after["batch_stats"])


# --- structure: §16.1 counts, §16.2 shapes --------------------------------------------------------------------

def n_params(tree) -> int:
  return sum(p.size for p in jax.tree.leaves(tree))


def test_parameter_counts_full_size():
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  full = jax.eval_shape(lambda x: lesion.GlobalVisualBranch().init(jax.random.key(0), x, False), image)
  v = full["params"]
  assert n_params(v["model"]) == 42_500_160
  assert len(jax.tree.leaves(v["model"])) + len(jax.tree.leaves(full["batch_stats"]["model"])) == 624 - 104
  assert n_params(v["cpca"]) == 6_521_344 and len(jax.tree.leaves(v["cpca"])) == 20
  assert n_params(v["local_embedder"]) == 2_097_152
  assert set(v) == {"model", "cpca", "local_embedder"}  # no classifier
  crop = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  s = jax.eval_shape(lambda x: lesion.SimpleConvNet().init(jax.random.key(0), x, False), crop)
  assert n_params(s["params"]) == 6_274_560
  assert len(jax.tree.leaves(s)) == len(ref.SimpleConvNet().state_dict()) - 5 == 30  # − num_batches_tracked
  p = jax.eval_shape(lambda x: lesion.PPA().init(jax.random.key(0), x, False), crop)["params"]
  assert n_params(p) == 480 == sum(t.numel() for t in ref.PPA(3, 3).parameters())
  assert sum(t.numel() for t in ref.CPCA(2048, 2048).parameters()) == 6_521_344


def test_shapes_of_spec_16_2():
  b, m = 2, 3
  args = (jax.ShapeDtypeStruct((b, 384, 384, 3), jnp.float32), jax.ShapeDtypeStruct((b, m, 384, 384, 3), jnp.float32),
          jax.ShapeDtypeStruct((b, m), jnp.bool_))
  module = lesion.MultiTargetExtractor()

  def run(images, regions, valid):
    variables = module.init(jax.random.key(0), images, regions, valid, False)
    return module.apply(variables, images, regions, valid, False, capture_intermediates=True, mutable=["intermediates"])
  (region_feats, avg_feats, patch_feats), state = jax.eval_shape(run, *args)
  assert (region_feats.shape, avg_feats.shape, patch_feats.shape) == ((2, 3, 1024), (2, 1024), (2, 144, 1024))
  inter = state["intermediates"]
  ve = inter["visual_extractor"]
  assert ve["model"]["__call__"][0].shape == (2, 12, 12, 2048)
  assert ve["cpca"]["__call__"][0].shape == (2, 12, 12, 2048)
  assert ve["local_embedder"]["__call__"][0].shape == (2, 12, 12, 1024)
  assert inter["region_visual_extractor"]["__call__"][0].shape == (6, 384, 384, 3)
  maps = [inter["simple"][f"conv{i}"]["__call__"][0].shape[1] for i in range(1, 6)]
  assert maps == [382, 190, 94, 46, 22]


def test_bfloat16_compute_close_to_float32_and_statistics_stay_float32():
  images, regions = nhwc(rand(50, 2, 3, 64, 64)), nhwc(placeholder_regions(51, 2, 3, 52, EMPTY))
  valid = lesion.region_valid(regions)
  kwargs = dict(widths=TINY_SIMPLE, depth=18, resnet_widths=TINY_RESNET, lera_dropout=0.0)
  f32, bf16 = lesion.MultiTargetExtractor(**kwargs), lesion.MultiTargetExtractor(**kwargs, dtype=jnp.bfloat16)
  tmodel, _ = make_lesion_pair(52, "ppa")
  ref_resnet.scale_residual_bns_(tmodel, 0.3)
  variables = to_variables(f32, (images, regions, valid, False), state_dict(tmodel))
  want = jax.jit(lambda v: f32.apply(v, images, regions, valid, False))(variables)
  got = jax.jit(lambda v: bf16.apply(v, images, regions, valid, False))(variables)
  for name, g, w in zip(("region_feats", "avg_feats", "patch_feats"), got, want):
    assert g.dtype == jnp.bfloat16
    err = float(np.max(np.abs(np.asarray(g, np.float32) - w)) / np.max(np.abs(w)))
    print(f"PARITY multi-target extractor tiny bf16 vs fp32 eval {name}: rel {err:.3e}")
    assert err < 0.05, (name, err)
  # train mode (per-region path): bf16 outputs, float32 statistics (shapes only)
  out, state = jax.eval_shape(lambda v: bf16.apply(v, images, regions, valid, True, mutable=["batch_stats"]),
                              variables)
  assert all(o.dtype == jnp.bfloat16 for o in out)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state["batch_stats"]) == jax.tree.map(
      lambda a: (a.shape, a.dtype), variables["batch_stats"])


def test_bad_switches_raise():
  regions, valid = jnp.zeros((1, 1, 52, 52, 3)), jnp.ones((1, 1), bool)
  for kwargs, match in ((dict(lera="cbam"), "lera='cbam'"), (dict(region_bn="group"), "region_bn='group'")):
    with pytest.raises(ValueError, match=match):
      lesion.LesionBranch(TINY_SIMPLE, **kwargs).init(jax.random.key(0), regions, valid, False)
  with pytest.raises(ValueError, match="similarity method"):
    align.similarity_matrix(jnp.zeros((1, 1, 2)), jnp.ones((1, 1), bool), jnp.zeros((1, 1, 2)),
                            jnp.ones((1, 1), bool), method="cosine")


# --- alignment: §16.8, masks, LAB, jit ------------------------------------------------------------------------

def naaf(text, visual):
  text, visual = jnp.asarray(text, jnp.float32), jnp.asarray(visual, jnp.float32)
  return jax.jit(align.naaf_similarity)(text, jnp.ones(len(text), bool), visual, jnp.ones(len(visual), bool))


@pytest.mark.parametrize("text,visual,want", [
    ([[1, 0]], [[1, 0], [0, 1]], 1.9999999979),
    ([[1, 0]], [[-1, 0], [-0.6, -0.8]], -1.39999987),
    ([[1, 0, 0], [0.6, 0.8, 0]], np.eye(3), 1.805421),
])
def test_naaf_vectors_of_spec_16_8(text, visual, want):
  got = naaf(text, visual)
  exact = float(ref.naaf_similarity(torch.tensor(text, dtype=torch.float64), torch.tensor(visual, dtype=torch.float64)))
  print(f"PARITY naaf §16.8 {want}: jax {float(got):.9f}, torch float64 {exact:.9f}")
  assert abs(float(got) - want) <= 1e-6 and abs(exact - want) <= 1e-6


def padded_batch(seed: int, b: int, length: int, d: int, lengths):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, length, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
  x[~mask] = rng.normal(size=(int((~mask).sum()), d)) * 50  # garbage in the padding must not matter
  return x, mask


@pytest.mark.parametrize("method", ["naaf", "scan"])
def test_similarity_matrix_orientation_masks_and_reference(method):
  text, tmask = padded_batch(30, 3, 5, 8, [5, 2, 3])
  visual, vmask = padded_batch(31, 2, 4, 8, [4, 1])
  visual *= 3  # not unit rows: imgnorm matters
  sim = jax.jit(lambda *a: align.similarity_matrix(*a, method=method))(text, tmask, visual, vmask)
  assert sim.shape == (2, 3)  # rows = images, columns = texts
  fn = ref.naaf_similarity if method == "naaf" else ref.scan_similarity
  def pair(i, j):
    return fn(torch.from_numpy(text[j][tmask[j]]).double(), torch.from_numpy(visual[i][vmask[i]]).double())
  want = np.array([[float(pair(i, j)) for j in range(3)] for i in range(2)])
  check(f"{method} similarity matrix vs float64 reference", sim, want, atol=1e-6)


def test_similarity_of_empty_sets_is_zero_with_finite_gradients():
  text, tmask = padded_batch(32, 2, 3, 4, [3, 0])
  visual, vmask = padded_batch(33, 2, 2, 4, [0, 2])
  for method in ("naaf", "scan"):
    f = lambda t, v, m=method: jnp.sum(align.similarity_matrix(t, tmask, v, vmask, method=m))
    sim = jax.jit(lambda t, v, m=method: align.similarity_matrix(t, tmask, v, vmask, method=m))(text, visual)
    assert np.all(np.asarray(sim)[0] == 0) and np.all(np.asarray(sim)[:, 1] == 0)
    grads = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(text), jnp.asarray(visual))
    assert all(np.all(np.isfinite(g)) for g in grads)


SIM_16_8 = np.array([[0.9, 0.5, 0.2], [0.6, 0.8, 0.1], [0.3, 0.75, 0.7]], np.float32)


def test_ranking_loss_vector_reductions_and_lab_masking_under_jit():
  loss = jax.jit(align.ranking_loss, static_argnames=("reduction",))
  got = float(loss(SIM_16_8, 0.2))
  print(f"PARITY ranking loss §16.8: {got:.8f} (want 0.40)")
  assert abs(got - 0.40) <= 1e-6
  assert abs(float(loss(SIM_16_8, 0.2, "mean")) - 0.40 / 3) <= 1e-6
  keep = jnp.array([True, False, True])  # = the loss of the 2×2 sub-matrix of images/texts 0 and 2
  sub = SIM_16_8[np.ix_([0, 2], [0, 2])]
  assert abs(float(loss(SIM_16_8, 0.2, mask=keep)) - float(loss(sub, 0.2))) <= 1e-7
  assert abs(float(loss(SIM_16_8, 0.2, "mean", keep)) - float(loss(sub, 0.2)) / 2) <= 1e-7
  for mask in ([True, False, False], [False, False, False]):  # B' < 2 → 0
    assert float(loss(SIM_16_8, 0.2, "mean", jnp.array(mask))) == 0.0
  with pytest.raises(ValueError, match="reduction"):
    align.ranking_loss(SIM_16_8, reduction="max")


def test_sentence_vectors_and_lab_loss_equal_python_filtering_under_jit():
  rng = np.random.default_rng(40)
  b, s, t, d, m = 4, 3, 5, 8, 3
  tokens = rng.normal(size=(b, s, t, d)).astype(np.float32)
  token_mask = np.zeros((b, s, t), bool)
  lengths = [[5, 2, 0], [3, 0, 0], [0, 0, 0], [4, 4, 1]]  # image 2: no sentence
  for i in range(b):
    for j in range(s):
      token_mask[i, j, :lengths[i][j]] = True
  regions = rng.normal(size=(b, m, d)).astype(np.float32)
  region_valid = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]], bool)  # image 1: no region
  sent, sent_mask = jax.jit(align.sentence_vectors)(tokens, token_mask)
  mean = (tokens * token_mask[..., None]).sum(2) / np.maximum(token_mask.sum(2, keepdims=True), 1)
  check("sentence vectors", sent, mean / (np.linalg.norm(mean, axis=-1, keepdims=True) + 1e-8), atol=1e-6)
  assert np.all(np.asarray(sent)[token_mask.sum(-1) == 0] == 0)
  keep = align.lab_mask(jnp.asarray(region_valid), sent_mask)
  np.testing.assert_array_equal(keep, [True, False, False, True])

  @jax.jit
  def lab(tokens, token_mask, regions, region_valid):
    sent, sent_mask = align.sentence_vectors(tokens, token_mask)
    return align.alignment_loss(sent, sent_mask, regions, region_valid,
                                image_mask=align.lab_mask(region_valid, sent_mask), margin=1.0)
  got = lab(tokens, token_mask, regions, region_valid)
  idx = [0, 3]  # Python filtering: only images with a region and a sentence; the float64 reference score
  sent, sent_mask = np.asarray(sent), np.asarray(sent_mask)
  sim = np.array([[float(ref.naaf_similarity(torch.from_numpy(sent[j][sent_mask[j]]).double(),
                                             torch.from_numpy(regions[i][region_valid[i]]).double()))
                   for j in idx] for i in idx])
  want = float(align.ranking_loss(jnp.asarray(sim), 1.0))
  unmasked = float(jax.jit(lambda *a: align.alignment_loss(*a, margin=1.0))(sent, sent_mask, regions, region_valid))
  print(f"PARITY LAB loss masked {float(got):.7f} vs Python-filtered {want:.7f} (unmasked {unmasked:.4f})")
  assert abs(float(got) - want) <= 1e-6 and want > 1 and abs(unmasked - want) > 0.1
  grads = jax.grad(lambda x, r: lab(x, token_mask, r, region_valid), argnums=(0, 1))(tokens, regions)
  assert all(np.all(np.isfinite(g)) for g in grads)
  one = region_valid.copy()
  one[3] = False  # B' = 1 → 0
  assert float(lab(tokens, token_mask, regions, one)) == 0.0
