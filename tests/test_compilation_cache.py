"""rrg_jax.compilation_cache: where the persistent cache goes, and that a second process loads instead of
compiling (fresh interpreters, since JAX fixes its cache directory at the first compilation)."""

import os
import subprocess
import sys

from tests.conftest import REPO

_CHILD = """
import jax, jax.numpy as jnp
from rrg_jax import compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                       if event == "/jax/compilation_cache/cache_hits" else None)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
print("dir", compilation_cache.enable())
jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((8, 8))).compile()
print("hits", len(hits))
"""


def _run(env_cache: str | None, home) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "RRG_JAX_COMPILATION_CACHE")}
  env["XDG_CACHE_HOME"] = str(home)
  if env_cache is not None:
    env["RRG_JAX_COMPILATION_CACHE"] = env_cache
  out = subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  return dict(line.split(" ", 1) for line in out.splitlines())


def test_second_process_hits_the_cache(tmp_path):
  cache = tmp_path / "xla"
  first = _run(str(cache), tmp_path / "home")
  assert first == {"dir": str(cache), "hits": "0"}
  assert any(cache.iterdir())
  assert int(_run(str(cache), tmp_path / "home")["hits"]) >= 1  # the jitted function (and jnp.ones)


def test_default_dir_and_off(tmp_path):
  home = tmp_path / "home"
  assert _run(None, home)["dir"] == str(home / "rrg_jax" / "xla")
  assert any((home / "rrg_jax" / "xla").iterdir())
  off = _run("off", tmp_path / "home2")
  assert off == {"dir": "None", "hits": "0"}
  assert not (tmp_path / "home2").exists()
