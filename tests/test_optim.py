"""rrg_jax.optim against torch.optim.Adam(amsgrad=True) + clip_grad_value_ and the spec §8 schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from conftest import tiny_config
from rrg_jax import optim

STEPS = 25
SPE = 4  # steps per epoch


def _params(rng: np.random.Generator) -> dict:
  """A params tree with both groups and the frozen FBL back_norm."""
  f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  return {
      "visual_extractor": {"model": {"conv0": {"kernel": f(3, 3, 2, 4)}}, "head": {"kernel": f(4, 3),
                                                                              "bias": f(3)}},
      "fore_back_learn": {"fore_norm": {"gamma": f(6), "beta": f(6)},
                          "back_norm": {"gamma": f(6), "beta": f(6)}},
      "encoder_decoder": {"logit": {"kernel": f(5, 7), "bias": f(7)}},
  }


def _config(warmup_epochs: int, decay_epochs: int):
  c = tiny_config()
  c.optim.lr_ve, c.optim.lr_ed = 1e-3, 2e-3
  c.optim.warmup_epochs, c.optim.warmup_lr = warmup_epochs, 1e-4
  c.optim.decay_epochs, c.optim.decay_rate = decay_epochs, 0.8
  return c


def _flat(tree) -> dict:
  return {"/".join(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _hand_lr(base: float, s: int, warmup_t: int, decay_t: int, warmup_lr: float = 1e-4) -> float:
  """Spec §8 written out: step 0 uses the construction lr, step s >= 1 uses timm lr(s - 1)."""
  if s == 0:
    return warmup_lr if warmup_t > 0 else base
  t = s - 1
  if t < warmup_t:
    return warmup_lr + t * (base - warmup_lr) / warmup_t
  return base * 0.8 ** (t // decay_t)


def _torch_run(params: dict, grads: list[dict], config, frozen_paths: set[str]) -> dict:
  """The official trainer's inner loop: backward → clip_grad_value_ → Adam.step → scheduler sets lr(g)."""
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in _flat(params).items()}
  ve = [p for k, p in tp.items() if k.startswith("visual_extractor")]
  ed = [p for k, p in tp.items() if not k.startswith("visual_extractor")]
  o = config.optim
  warmup_t, decay_t = o.warmup_epochs * SPE, o.decay_epochs * SPE
  opt = torch.optim.Adam([{"params": ve, "lr": o.lr_ve}, {"params": ed, "lr": o.lr_ed}],
                         betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-5, amsgrad=True)
  base = [o.lr_ve, o.lr_ed]
  if warmup_t > 0:  # timm Scheduler.__init__: both groups start at warmup_lr
    for g in opt.param_groups:
      g["lr"] = o.warmup_lr
  for step, g in enumerate(grads):
    gflat = _flat(g)
    opt.zero_grad(set_to_none=True)
    for k, p in tp.items():
      if k not in frozen_paths:  # back_norm gets no .grad in torch
        p.grad = torch.tensor(gflat[k])
    torch.nn.utils.clip_grad_value_([p for p in tp.values() if p.grad is not None], 0.1)
    opt.step()
    for grp, b in zip(opt.param_groups, base):  # lr_scheduler.step_update(g) → lr(g)
      grp["lr"] = _hand_lr(b, step + 1, warmup_t, decay_t)
  return {k: p.detach().numpy() for k, p in tp.items()}


def _jax_run(params: dict, grads: list[dict], tx: optax.GradientTransformation) -> dict:
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return _flat(params)


@pytest.mark.parametrize("warmup_epochs,decay_epochs", [(0, 50), (2, 3)])
def test_matches_torch_adam_amsgrad_with_clipping_and_schedule(warmup_epochs, decay_epochs):
  rng = np.random.default_rng(0)
  params = _params(rng)
  # Scales 0.02..1 so some gradients are clipped and some not; some steps tiny so vmax stays above v.
  grads = [jax.tree.map(lambda p: (rng.normal(size=p.shape) * rng.choice([0.02, 0.3, 1.0])).astype(np.float32),
                        params) for _ in range(STEPS)]
  config = _config(warmup_epochs, decay_epochs)
  frozen = {"fore_back_learn/back_norm/gamma", "fore_back_learn/back_norm/beta"}
  want = _torch_run(params, grads, config, frozen)
  got = _jax_run(params, grads, optim.make_optimizer(config, SPE))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  start = _flat(params)
  for k in want:
    if k in frozen:  # bitwise unchanged (no decay, no update) although the JAX side got a gradient
      np.testing.assert_array_equal(got[k], start[k])
    else:
      assert np.abs(got[k] - start[k]).max() > 1e-4, k


def test_optax_amsgrad_semantics_differ_from_torch():
  """The test above would catch optax.amsgrad (max over the bias-corrected second moment)."""
  rng = np.random.default_rng(1)
  params = _params(rng)
  # Large early gradients, then small ones: the raw-v max and the bias-corrected max disagree.
  grads = [jax.tree.map(lambda p: (rng.normal(size=p.shape) * (1.0 if i < 3 else 0.01)).astype(np.float32),
                        params) for i in range(STEPS)]
  config = _config(0, 50)
  want = _torch_run(params, grads, config, set())
  config.optim.frozen = ()
  ours = _jax_run(params, grads, optim.make_optimizer(config, SPE))
  wrong_tx = optax.multi_transform(
      {g: optax.chain(optax.clip(0.1), optax.add_decayed_weights(5e-5), optax.amsgrad(lr))
       for g, lr in (("ve", 1e-3), ("ed", 2e-3))},
      lambda p: optim.param_labels(p, optim.param_groups(config)))
  wrong = _jax_run(params, grads, wrong_tx)
  worst = max(np.abs(wrong[k] - want[k]).max() / (np.abs(want[k]).max()) for k in want)
  assert worst > 1e-4
  for k in want:
    np.testing.assert_allclose(ours[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("warmup_epochs,decay_epochs", [(0, 50), (3, 5), (1, 1)])
def test_schedule_matches_spec_formula_with_lag(warmup_epochs, decay_epochs):
  config = _config(warmup_epochs, decay_epochs)
  scheds = optim.learning_rate_schedules(config, SPE)
  warmup_t, decay_t = warmup_epochs * SPE, decay_epochs * SPE
  for s in range(0, 60):
    for name, base in (("ve", 1e-3), ("ed", 2e-3)):
      assert math.isclose(float(scheds[name](s)), _hand_lr(base, s, warmup_t, decay_t), rel_tol=1e-6), (s, name)


def test_schedule_known_values():
  """MIMIC recipe: both groups start at warmup_lr, steps 0 and 1 equal, constant after warm-up + 1 step."""
  c = tiny_config("mimic_cxr")
  s = optim.learning_rate_schedules(c, 10)
  ve, ed = s["ve"], s["ed"]
  assert float(ve(0)) == pytest.approx(5e-6) and float(ed(0)) == pytest.approx(5e-6)
  assert float(ve(1)) == pytest.approx(5e-6) and float(ed(1)) == pytest.approx(5e-6)
  assert float(ed(2)) == pytest.approx(5e-6 + (1e-4 - 5e-6) / 30)
  assert float(ve(30)) == pytest.approx(5e-5 - (5e-5 - 5e-6) / 30)  # lr(29): last warm-up value
  assert float(ve(31)) == pytest.approx(5e-5) and float(ed(31)) == pytest.approx(1e-4)
  assert float(ed(299)) == pytest.approx(1e-4)
  iu = optim.learning_rate_schedules(tiny_config("iu_xray"), 64)  # constant 1e-3 / 2e-3 for 30 epochs
  assert [float(iu["ed"](t)) for t in (0, 1, 1919)] == pytest.approx([2e-3] * 3)
  assert float(iu["ve"](3201)) == pytest.approx(0.8e-3)  # decay at lr(3200), used one step later
  assert float(iu["ve"](3200)) == pytest.approx(1e-3)


def test_param_labels():
  groups = optim.param_groups(tiny_config())
  assert groups == {"ve": ("visual_extractor",), "ed": ("",)}
  labels = optim.param_labels(_params(np.random.default_rng(0)), groups, ("fore_back_learn/back_norm",))
  assert labels["visual_extractor"]["head"]["bias"] == "ve"
  assert labels["visual_extractor"]["model"]["conv0"]["kernel"] == "ve"
  assert labels["fore_back_learn"]["fore_norm"]["gamma"] == "ed"
  assert labels["fore_back_learn"]["back_norm"]["beta"] == optim.FROZEN_GROUP
  assert labels["encoder_decoder"]["logit"]["kernel"] == "ed"
  # Longest prefix wins; a prefix matches whole path components only; an unmatched parameter is an error.
  labels = optim.param_labels(_params(np.random.default_rng(0)), {"a": ("visual_extractor",),
                                                                  "b": ("visual_extractor/head",), "c": ("",),
                                                                  "d": ("enc",)})
  assert labels["visual_extractor"]["head"]["bias"] == "b" and labels["visual_extractor"]["model"]["conv0"][
      "kernel"] == "a"
  assert labels["encoder_decoder"]["logit"]["kernel"] == "c"  # "enc" is no whole path component
  with pytest.raises(ValueError, match="encoder_decoder/logit/bias is in no group"):
    optim.param_labels(_params(np.random.default_rng(0)), {"a": ("visual_extractor",), "c": ("enc",)})


def test_param_groups_need_a_learning_rate():
  c = tiny_config()
  c.optim.param_groups.rest = ("x",)
  with pytest.raises(ValueError, match="group 'rest' but config.optim has no lr_rest"):
    optim.param_groups(c)


def test_step_lr_schedule_is_torch_steplr_stepped_per_epoch():
  """R2Gen: torch StepLR(step_size, gamma).step() after every epoch → the lr of step s is
  base · gamma^floor(epoch(s) / step_size), no lag."""
  from conftest import tiny_r2gen_config  # pylint: disable=g-import-not-at-top

  c = tiny_r2gen_config()
  c.optim.decay_epochs, c.optim.decay_rate = 2, 0.5
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.Adam([{"params": [p], "lr": c.optim.lr_ve}])
  sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
  ours = optim.learning_rate_schedules(c, SPE)["ve"]
  for epoch in range(7):
    for b in range(SPE):
      assert float(ours(epoch * SPE + b)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), (epoch, b)
    sched.step()


def test_frozen_epochs_match_torch_parameters_unfrozen_later():
  """A group frozen for its first epoch: no update then, and from the unfreezing step on the same updates as torch
  Adam for parameters that get their first gradient there (fresh moments, bias correction from t = 1), while the
  other group trains throughout and the schedule counts every step."""
  rng = np.random.default_rng(3)
  params = _params(rng)
  grads = [jax.tree.map(lambda p: (rng.normal(size=p.shape) * 0.05).astype(np.float32), params) for _ in range(12)]
  config = _config(0, 50)
  config.optim.frozen = ()
  config.optim.frozen_epochs.ve = 1
  got = _jax_run(params, grads, optim.make_optimizer(config, SPE))
  start = _flat(params)
  # torch: the VE group joins at step SPE (its params get no .grad before).
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
  opt = torch.optim.Adam([{"params": [p for k, p in tp.items() if k.startswith("visual_extractor")], "lr": 1e-3},
                          {"params": [p for k, p in tp.items() if not k.startswith("visual_extractor")],
                           "lr": 2e-3}], weight_decay=5e-5, amsgrad=True)
  for step, g in enumerate(grads):
    opt.zero_grad(set_to_none=True)
    for k, p in tp.items():
      if step >= SPE or not k.startswith("visual_extractor"):
        p.grad = torch.tensor(_flat(g)[k])
    torch.nn.utils.clip_grad_value_([p for p in tp.values() if p.grad is not None], 0.1)
    opt.step()
  for k, p in tp.items():
    np.testing.assert_allclose(got[k], p.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
  frozen_after_epoch_0 = _jax_run(params, grads[:SPE], optim.make_optimizer(config, SPE))
  for k in start:
    if k.startswith("visual_extractor"):
      np.testing.assert_array_equal(frozen_after_epoch_0[k], start[k])
    else:
      assert np.abs(frozen_after_epoch_0[k] - start[k]).max() > 1e-4
  with pytest.raises(ValueError, match="frozen_epochs names"):
    config.optim.frozen_epochs.nope = 1
    optim.make_optimizer(config, SPE)


def test_frozen_groups_get_no_backward_pass():
  """``frozen_groups`` per epoch and ``without_gradient``: the gradient of a frozen group's leaves is exactly zero
  (no backward pass through them), the other leaves' gradients are unchanged (radgen_spec §5.2's frozen step)."""
  rng = np.random.default_rng(4)
  params = jax.tree.map(jnp.asarray, _params(rng))
  config = _config(0, 50)
  config.optim.frozen = ("fore_back_learn",)
  config.optim.frozen_epochs.ve = 2
  assert optim.frozen_groups(config, 0) == optim.frozen_groups(config, 1) == {"frozen", "ve"}
  assert optim.frozen_groups(config, 2) == {"frozen"}

  def loss(p):
    return sum(jnp.sum(jnp.sin(x) * (i + 1)) for i, x in enumerate(jax.tree.leaves(p)))

  full = jax.grad(loss)(params)
  cut = jax.grad(lambda p: loss(optim.without_gradient(config, optim.frozen_groups(config, 0))(p)))(params)
  labels = optim.param_labels(params, optim.param_groups(config), tuple(config.optim.frozen))
  seen = set()
  for label, a, b in zip(jax.tree.leaves(labels), jax.tree.leaves(full), jax.tree.leaves(cut)):
    seen.add(label)
    if label in ("ve", "frozen"):
      assert not np.asarray(b).any() and np.asarray(a).any()
    else:
      np.testing.assert_array_equal(b, a)
  assert seen == {"ve", "ed", "frozen"}


def test_torch_adam_without_amsgrad():
  rng = np.random.default_rng(2)
  p = jnp.asarray(rng.normal(size=(5,)).astype(np.float32))
  tp = torch.nn.Parameter(torch.tensor(np.asarray(p)))
  opt = torch.optim.Adam([tp], lr=1e-2, amsgrad=False)
  tx = optax.chain(optim.scale_by_torch_adam(amsgrad=False), optax.scale(-1e-2))
  state = tx.init(p)
  for _ in range(10):
    g = rng.normal(size=(5,)).astype(np.float32)
    tp.grad = torch.tensor(g)
    opt.step()
    u, state = tx.update(jnp.asarray(g), state)
    p = p + u
  np.testing.assert_allclose(np.asarray(p), tp.detach().numpy(), rtol=1e-6)


def test_cosine_epoch_schedule_is_torch_cosine_annealing_stepped_per_epoch():
  """Align2Gen: CosineAnnealingLR(T_max=25) stepped after every epoch, eta_min never passed (0): the spec's table
  (§16.7: epoch 26 trains at exactly 0, epoch 50 back at 9.96057e-5) and torch's scheduler itself, also with an
  eta_min (the corrected switch)."""
  from conftest import tiny_r2gen_config  # pylint: disable=g-import-not-at-top

  c = tiny_r2gen_config()
  c.optim.schedule, c.optim.cosine_t_max = "cosine_epoch", 25
  c.optim.lr_ve = c.optim.lr_ed = 1e-4
  ours = optim.learning_rate_schedules(c, SPE)["ve"]
  table = {1: 1.0e-4, 2: 9.96057e-5, 13: 5.31395e-5, 25: 3.94265e-7, 26: 0.0, 27: 3.94265e-7, 30: 6.18467e-6,
           50: 9.96057e-5}
  for epoch, lr in table.items():  # 1-based epochs
    assert float(ours((epoch - 1) * SPE + SPE - 1)) == pytest.approx(lr, rel=1e-5, abs=1e-12), epoch
  for eta_min in (0.0, 1e-6):
    c.optim.eta_min = eta_min
    ours = optim.learning_rate_schedules(c, SPE)["ve"]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p], "lr": 1e-4}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=25, eta_min=eta_min)
    for epoch in range(60):
      for b in (0, SPE - 1):
        assert float(ours(epoch * SPE + b)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5, abs=1e-12), (
            eta_min, epoch)
      opt.step()
      sched.step()


# --- RadGen: torch AdamW, per-group decay, global-norm clipping, HF linear warm-up/decay, unfreezing (§5) -----

def _linear_warmup_config(epochs: int, warmup_epochs: int, decay: str = "linear"):
  c = tiny_config()
  c.train.epochs = epochs
  c.optim.schedule, c.optim.warmup_epochs, c.optim.decay = "linear_warmup_decay", warmup_epochs, decay
  return c


def test_linear_warmup_decay_spec_vectors():
  """radgen_spec §15.7 (S = 604, W = 1812): μ(s) to the spec's printed digits, through the config (lr 1), and the
  text group's lr 2e-5·μ when it unfreezes at step 2416."""
  c = _linear_warmup_config(30, 3)
  c.optim.lr_ve, c.optim.lr_ed = 2e-5, 1.0
  s = optim.learning_rate_schedules(c, 604)
  mu = s["ed"]
  for step, want in ((0, 0.0), (1, 0.000552), (906, 0.5), (1811, 0.999448), (1812, 1.0), (2416, 0.962963),
                     (18119, 6.1e-5)):
    assert abs(float(mu(step)) - want) <= 5e-7, (step, float(mu(step)))
  assert float(mu(0)) == 0.0 and float(mu(1812)) == 1.0 and float(mu(18120)) == 0.0
  assert float(s["ve"](2416)) == pytest.approx(1.925926e-5, abs=5e-12)
  c.train.epochs = 10  # the code's E = 10 (T = 6,040)
  mu10 = optim.learning_rate_schedules(c, 604)["ed"]
  assert abs(float(mu10(2416)) - 0.857143) <= 5e-7 and float(mu10(3926)) == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("warmup_epochs", [0, 2])
@pytest.mark.parametrize("decay", ["linear", "constant"])
def test_linear_warmup_decay_is_hf_lambda_schedule(decay, warmup_epochs):
  """Every step (and beyond T) against transformers' own get_{linear,constant}_schedule_with_warmup."""
  transformers = pytest.importorskip("transformers")
  c = _linear_warmup_config(6, warmup_epochs, decay)
  ours = optim.learning_rate_schedules(c, SPE)["ed"]
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=c.optim.lr_ed)
  w, t = warmup_epochs * SPE, 6 * SPE
  hf = (transformers.get_linear_schedule_with_warmup(opt, w, t) if decay == "linear"
        else transformers.get_constant_schedule_with_warmup(opt, w))
  for step in range(t + 3):
    assert float(ours(step)) == pytest.approx(c.optim.lr_ed * hf.lr_lambdas[0](step), rel=1e-6, abs=1e-12), step


def test_new_optim_keys_are_checked():
  c = _linear_warmup_config(3, 1, "cosine")
  with pytest.raises(ValueError, match="config.optim.decay='cosine'"):
    optim.learning_rate_schedules(c, SPE)
  c = tiny_config()
  c.optim.optimizer = "sgd"
  with pytest.raises(ValueError, match="config.optim.optimizer='sgd'"):
    optim.make_optimizer(c, SPE)
  c = tiny_config()
  c.optim.weight_decay_ve, c.optim.weight_decay_text = 0.1, 0.2
  with pytest.raises(ValueError, match=r"\['weight_decay_text'\], but no such group"):
    optim.make_optimizer(c, SPE)
  del c.optim["weight_decay_text"]
  assert optim.group_weight_decay(c) == {"ve": 0.1, "ed": c.optim.weight_decay}


RG_SPE, RG_EPOCHS, RG_FROZEN_EPOCHS = 3, 5, 2  # steps per epoch; text joins at step 6 (0-based)
RG_WD = {"text": 0.2, "head": 0.05}


def _rg_params(rng: np.random.Generator) -> dict:
  f = lambda *s: (rng.normal(size=s) * 0.7).astype(np.float32)  # noqa: E731
  return {"image": {"w": f(6, 5)}, "text": {"w": f(5, 4), "b": f(4)}, "head": {"w": f(4, 3), "b": f(3)}}


def _rg_forward(p, x, xp):
  h = xp.tanh(x @ p["image"]["w"])
  return xp.tanh(h @ p["text"]["w"] + p["text"]["b"]) @ p["head"]["w"] + p["head"]["b"]


def _rg_config(decay: str, clip_norm: float = 1.0):
  """Two groups: ``text`` (frozen for RG_FROZEN_EPOCHS) and ``head`` (everything else); AdamW, per-group decay,
  global-norm clipping, HF linear warm-up (1 epoch) and decay."""
  c = _linear_warmup_config(RG_EPOCHS, 1, decay)
  o = c.optim
  o.param_groups = ml_collections.ConfigDict({"text": ("text",), "head": ("",)})
  o.lr_text, o.lr_head = 2e-2, 5e-2
  o.frozen_epochs = ml_collections.ConfigDict({"text": RG_FROZEN_EPOCHS})
  o.frozen, o.amsgrad, o.clip_value = (), False, 0.0
  o.optimizer, o.clip_norm = "adamw", clip_norm
  o.weight_decay, o.weight_decay_head = RG_WD["text"], RG_WD["head"]  # text: the default, head: its override
  for unused in ("decay_epochs", "decay_rate", "warmup_lr"):  # the step schedules' keys: RadGen has none
    del o[unused]
  return c


def _rg_batches(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
  # Target scales 0.1 .. 5: the global gradient norm is below 1 at some steps and clipped at others.
  return [(rng.normal(size=(8, 6)).astype(np.float32),
           (rng.normal(size=(8, 3)) * rng.choice([0.1, 1.0, 5.0])).astype(np.float32)) for _ in range(n)]


def _rg_torch(params: dict, batches, decay: str) -> tuple[list[dict], list[float]]:
  """torch AdamW + HF LambdaLR + clip_grad_norm_(1.0); the text parameters have requires_grad False (grad None)
  for the first RG_FROZEN_EPOCHS epochs. Returns the parameters after every step and the pre-clip norms."""
  transformers = pytest.importorskip("transformers")
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in _flat(params).items()}
  tree = {"image": {"w": tp["image/w"]}, "text": {"w": tp["text/w"], "b": tp["text/b"]},
          "head": {"w": tp["head/w"], "b": tp["head/b"]}}
  text = [tp["text/w"], tp["text/b"]]
  opt = torch.optim.AdamW([{"params": text, "lr": 2e-2, "weight_decay": RG_WD["text"]},
                           {"params": [p for k, p in tp.items() if not k.startswith("text")], "lr": 5e-2,
                            "weight_decay": RG_WD["head"]}], betas=(0.9, 0.999), eps=1e-8, amsgrad=False)
  w, t = RG_SPE, RG_EPOCHS * RG_SPE
  sched = (transformers.get_linear_schedule_with_warmup(opt, w, t) if decay == "linear"
           else transformers.get_constant_schedule_with_warmup(opt, w))
  after, norms = [], []
  for step, (x, y) in enumerate(batches):
    for p in text:
      p.requires_grad_(step >= RG_FROZEN_EPOCHS * RG_SPE)
    opt.zero_grad(set_to_none=True)
    loss = torch.mean((_rg_forward(tree, torch.tensor(x), torch) - torch.tensor(y)) ** 2)
    loss.backward()
    norms.append(float(torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)))
    opt.step()
    sched.step()
    after.append({k: p.detach().numpy().copy() for k, p in tp.items()})
  return after, norms


def _rg_jax(params: dict, batches, tx: optax.GradientTransformation, zero_frozen_grads: bool):
  """Every step's parameters and optimiser state; the frozen text group's gradients are its real ones, or zeros
  (the spec's stop_gradient train step) with ``zero_frozen_grads``."""
  grad = jax.jit(jax.grad(lambda p, x, y: jnp.mean((_rg_forward(p, x, jnp) - y) ** 2)))
  update = jax.jit(tx.update)
  state = tx.init(params)
  out = []
  for step, (x, y) in enumerate(batches):
    g = grad(params, x, y)
    if zero_frozen_grads and step < RG_FROZEN_EPOCHS * RG_SPE:
      g = {**g, "text": jax.tree.map(jnp.zeros_like, g["text"])}
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append((_flat(params), state))
  return out


def _adam_state(opt_state, group: str) -> optim.TorchAdamState:
  multi = next(s for s in opt_state if isinstance(s, optax.MultiTransformState))
  is_adam = lambda s: isinstance(s, optim.TorchAdamState)  # noqa: E731
  return next(s for s in jax.tree.leaves(multi.inner_states[group], is_leaf=is_adam) if is_adam(s))


@pytest.mark.parametrize("decay", ["linear", "constant"])
def test_adamw_unfreezing_clip_norm_match_torch_step_by_step(decay):
  """radgen_spec §5.1/§5.2 against torch, every step: AdamW with per-group decay, clip_grad_norm_ over the
  parameters that have a gradient, HF schedule; the text group frozen (grad None in torch) for 2 epochs gets no
  update, no decay and no Adam-state change, then its own Adam count from 1 while its lr follows the global step."""
  rng = np.random.default_rng(7)
  params = _rg_params(rng)
  n = RG_EPOCHS * RG_SPE
  k = RG_FROZEN_EPOCHS * RG_SPE
  batches = _rg_batches(rng, n)
  want, norms = _rg_torch(params, batches, decay)
  assert min(norms) < 1.0 < max(norms)  # some steps clipped, some not
  assert any(nm > 1.0 for nm in norms[:k])  # clipping is active while text is frozen
  tx = optim.make_optimizer(_rg_config(decay), RG_SPE)
  got = _rg_jax(params, batches, tx, zero_frozen_grads=False)
  start = _flat(params)
  worst_abs = worst_rel = 0.0
  for step, ((ours, state), theirs) in enumerate(zip(got, want)):
    for key in theirs:
      diff = np.abs(ours[key] - theirs[key]).max()
      worst_abs = max(worst_abs, diff)
      worst_rel = max(worst_rel, diff / np.abs(theirs[key]).max())
      np.testing.assert_allclose(ours[key], theirs[key], rtol=2e-6, atol=2e-7, err_msg=f"step {step} {key}")
    text_adam, head_adam = _adam_state(state, "text"), _adam_state(state, "head")
    assert int(head_adam.count) == step + 1
    assert int(text_adam.count) == max(step + 1 - k, 0), step  # own count: t' = 1 at the first text update
    if step < k:  # frozen: bitwise unchanged parameters (no decay) and moments never touched
      for key in ("text/w", "text/b"):
        np.testing.assert_array_equal(ours[key], start[key])
      assert all(not np.asarray(m).any() for m in jax.tree.leaves((text_adam.mu, text_adam.nu)))
  assert worst_abs > 0 or worst_rel > 0  # (printed for the record: JAX vs torch float32)
  print(f"AdamW vs torch over {n} steps: max abs {worst_abs:.2e}, max rel (per leaf, to its max) {worst_rel:.2e}")
  # The text group moved once unfrozen, and its first update had lr_text·μ(k) (the global step), not μ(0) = 0.
  assert np.abs(got[k][0]["text/w"] - start["text/w"]).max() > 1e-3
  # Gradients of frozen parameters never enter the clip norm: real and zero frozen gradients give the same run.
  zeroed = _rg_jax(params, batches, tx, zero_frozen_grads=True)
  for (a, _), (b, _) in zip(got, zeroed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_clip_norm_excludes_frozen_paths_and_is_the_torch_formula():
  """clip_by_torch_global_norm on hand values: ‖(3, 4)‖ = 5 → factor 1/(5 + 1e-6); an unmarked leaf (9) neither
  counts nor stays unscaled; below max_norm the factor is exactly 1."""
  tx = optim.clip_by_torch_global_norm(1.0, lambda step, t: {"a": jnp.asarray(True), "frozen": step < 0})
  g = {"a": jnp.asarray([3.0, 4.0]), "frozen": jnp.asarray([9.0])}
  u, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.asarray(u["a"]), np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-7)
  np.testing.assert_allclose(np.asarray(u["frozen"]), np.array([9.0]) / (5 + 1e-6), rtol=1e-7)
  assert int(state.count) == 1
  small = {"a": jnp.asarray([0.3, 0.4]), "frozen": jnp.asarray([9.0])}
  u, _ = tx.update(small, state)
  np.testing.assert_array_equal(np.asarray(u["a"]), np.asarray(small["a"]))
  # Through make_optimizer: config.optim.frozen paths (torch: no grad) do not count either.
  c = tiny_config()
  c.optim.clip_norm, c.optim.clip_value, c.optim.weight_decay = 1.0, 0.0, 0.0
  params = _params(np.random.default_rng(0))
  big = jax.tree.map(np.zeros_like, params)
  big["fore_back_learn"]["back_norm"]["gamma"] = np.full(6, 100.0, np.float32)  # frozen: must not clip the rest
  big["encoder_decoder"]["logit"]["bias"] = np.full(7, 0.1, np.float32)  # norm 0.26 < 1: Adam's first step ±lr
  full_tx = optim.make_optimizer(c, SPE)
  u, _ = full_tx.update(big, full_tx.init(params), params)
  lr0 = float(optim.learning_rate_schedules(c, SPE)["ed"](0))
  np.testing.assert_allclose(np.asarray(u["encoder_decoder"]["logit"]["bias"]), -lr0 * 0.1 / (0.1 + 1e-8 / 1),
                             rtol=1e-6)


@pytest.mark.parametrize("remainder,grad_scale", [("drop", 65536.0), ("apply", 1.0)])
def test_gradient_accumulation_matches_ct_agrg_trainer(remainder, grad_scale):
  """ct_agrg_spec §6.5 / §13.17: AdamW (lr 5e-5, wd 0.01) receives ``clip(grad_scale/8 · Σ_{8 batches} g, ±0.1)``
  after every 8th batch of an epoch; the sum restarts each epoch, so with 19 batches per epoch the last 3 are
  dropped (the code) or applied as a last, smaller sum; StepLR(1 epoch, 0.5) counts epochs. Against torch written
  from the spec, every parameter after 3 epochs."""
  rng = np.random.default_rng(11)
  params = {"trainable": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                          "bias": rng.normal(size=(3,)).astype(np.float32)}}
  spe, epochs = 19, 3
  grads = [jax.tree.map(lambda p: (rng.normal(size=p.shape) * 1e-5).astype(np.float32), params)
           for _ in range(spe * epochs)]
  c = ml_collections.ConfigDict({"train": {"epochs": epochs}, "optim": {
      "param_groups": {"all": ("",)}, "lr_all": 5e-5, "optimizer": "adamw", "weight_decay": 0.01, "b1": 0.9,
      "b2": 0.999, "eps": 1e-8, "amsgrad": False, "clip_value": 0.1, "schedule": "step_lr", "decay_epochs": 1,
      "decay_rate": 0.5, "frozen": (), "accumulate_steps": 8, "grad_scale": grad_scale,
      "accumulate_remainder": remainder}})
  assert optim.updates_per_epoch(c, spe) == (2 if remainder == "drop" else 3)
  got = _jax_run(params, grads, optim.make_optimizer(c, spe))

  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in _flat(params).items()}
  opt = torch.optim.AdamW(list(tp.values()), lr=5e-5, weight_decay=0.01)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
  for e in range(epochs):
    opt.zero_grad(set_to_none=False)
    for p in tp.values():
      p.grad = torch.zeros_like(p)
    for i in range(spe):
      for k, p in tp.items():
        p.grad += torch.tensor(_flat(grads[e * spe + i])[k]) * (grad_scale / 8)
      if (i + 1) % 8 == 0 or (remainder == "apply" and i == spe - 1):
        torch.nn.utils.clip_grad_value_(list(tp.values()), 0.1)
        opt.step()
        for p in tp.values():
          p.grad.zero_()
    sched.step()
  for k, p in tp.items():
    np.testing.assert_allclose(got[k], p.detach().numpy(), rtol=1e-6, atol=1e-8, err_msg=k)
  moved = np.abs(got["trainable/kernel"] - params["trainable"]["kernel"]).max()
  assert moved > 1e-5  # updates happened (about 5e-5 per update)
