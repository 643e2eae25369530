"""Shared test fixtures. Forces 4 host CPU devices so sharding tests can build multi-device meshes (and compiles at
LLVM optimisation level 0, see below), and gives the
session one persistent XLA compilation cache (JAX_COMPILATION_CACHE_DIR, inherited by the CLI subprocesses), so a
program compiled by one test or subprocess is loaded, not recompiled, by the next."""

import os
import tempfile

# LLVM optimisation level 0: XLA:CPU compilation is most of this suite's time (a tiny model's train step compiles
# for 20–45 s, its runs take milliseconds); level 0 halves it, and the real-size parity tests, whose convolutions and
# matmuls are library calls either way, also ran faster (train_parity_full_iu 194 → 154 s). Same HLO, same math.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="rrg_jax_test_xla_cache_"))

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _tiny_transformer(m, vocab_size: int) -> None:
  """The memory-driven transformer at width 32, 1 layer, 4 heads."""
  m.vocab_size = vocab_size
  m.d_model = m.d_ff = m.rm_d_model = 32
  m.num_heads = m.rm_num_heads = 4
  m.num_layers = 1
  m.rm_num_slots = 3


def tiny_config(preset: str = "", num_views: int = 1, vocab_size: int = 40, num_classes: int = 5):
  """A CAMANet config small enough for CPU unit tests: 64x64 images, 1 layer, width 32."""
  from configs import camanet

  c = camanet.get_config(preset)
  c.data.image_size = 64
  c.data.resize = 72
  c.data.num_views = num_views
  m = c.model
  m.growth_rate = 8
  m.block_config = (1, 1, 1, 1)
  m.num_init_features = 16
  m.bn_size = 2
  m.num_classes = num_classes
  _tiny_transformer(m, vocab_size)
  m.layer_id = 0
  c.train.batch_size = 4
  return c


def random_init_variables(config, seq_len: int = 10):
  """Random-init variables of the tiny CAMANet ``config`` (``config.model.vocab_size`` set), eval-mode init."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rrg_jax import models  # pylint: disable=g-import-not-at-top

  model = models.get_model(config.model)
  s = config.data.image_size
  return jax.jit(functools.partial(model.init, train=False))(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((1, 1, s, s, 3)),
      jnp.zeros((1, seq_len), jnp.int32), jnp.ones((1, seq_len)))


def tiny_r2gen_config(preset: str = "", num_views: int = 1, vocab_size: int = 40):
  """An R2Gen config small enough for CPU unit tests: 64x64 images, ResNet-18 of widths 8..64, 1 layer, width 32."""
  from configs import r2gen

  c = r2gen.get_config(preset)
  c.data.image_size = 64
  c.data.resize = 72
  c.data.num_views = num_views
  m = c.model
  m.backbone = "resnet18"
  m.resnet_widths = (8, 16, 32, 64)
  _tiny_transformer(m, vocab_size)
  c.train.batch_size = 4
  return c


def tiny_align2gen_config(vocab_size: int = 40):
  """An Align2Gen config (the sample preset: CAM boxes, both alignment losses, no LERA) small enough for CPU tests:
  64x64 images, ResNet-18 of widths 8..64, M = 3 crops of 64², a 1-layer BERT of width 16 over a ≤ 128-id text
  tokenizer, transformer width 32."""
  from configs import align2gen

  c = align2gen.get_config("sample")
  d = c.data
  d.image_size, d.resize, d.region_size, d.max_boxes, d.max_seq_length = 64, 72, 64, 3, 10
  d.text_max_tokens, d.sentence_max_tokens, d.max_sentences = 12, 6, 3
  d.text_tokenizer_vocab_size = 128  # the sample's alphabet + specials need 81
  m = c.model
  m.resnet_widths = (8, 16, 32, 64)
  m.simple_widths = (4, 8, 8, 16, 64)
  m.lera = "identity"  # PPA is covered by the parity tests; here it would only add compile time
  m.bert.update(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32)
  _tiny_transformer(m, vocab_size)
  c.train.batch_size = 4
  return c


def tiny_radgen_config():
  """RadGen's ``radgen_tiny`` preset (radgen_spec §3.10: 56² images, Swin of width 16 → 49 tokens, BART / BERT of
  width 32, fusion width 32) on the embedded sample's 3 classes, batch 4."""
  from configs import radgen

  c = radgen.get_config("radgen_tiny")
  c.model.vocab_size = 40
  c.train.batch_size = 4
  return c


# Every registered system's tiny config: the system-generic tests (train loop, resume, devices) run on each.
TINY_CONFIGS = {"camanet": lambda: tiny_config(num_classes=15), "r2gen": tiny_r2gen_config,
                "align2gen": tiny_align2gen_config, "radgen": tiny_radgen_config}


@pytest.fixture
def shared_dir() -> pathlib.Path:
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} (the workplace's shared/ folder) is not present")
  return SHARED
