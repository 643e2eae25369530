"""rrg_jax.optim against torch.optim.Adam(amsgrad=True) + clip_grad_value_ and the spec §8 schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
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
