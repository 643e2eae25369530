"""Multi-process training for real: 2 processes × 2 CPU devices on localhost, launched the way a cluster launches
``python -m rrg_jax.train`` (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; Gloo
collectives), against one process × 4 devices with the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from test_train import _CACHE_EVERY_PROGRAM, _config_file, _restore_state, _steps, _train_cli

BATCH = 16  # global; 8 rows per process, 4 per device (fewer, larger steps: each launch costs more than its steps)
STEPS = 147 // BATCH  # the embedded sample's 147 train records → 9 steps
VAL_RECORDS = 13  # one eval batch of 16: 8 real rows on process 0, 5 real + 3 padding rows on process 1
ARGS = ("--config.train.epochs=1", f"--config.train.batch_size={BATCH}", "--config.train.eval_splits=('val',)",
        f"--config.train.max_eval_examples={VAL_RECORDS}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Cluster:
  """Two ``rrg_jax.train`` processes of one job; every wait is bounded and a failure kills both."""

  def __init__(self, tmp_path, workdir, tag: str, *args: str):
    env = {**os.environ, **_CACHE_EVERY_PROGRAM, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
           "JAX_NUM_PROCESSES": "2", "RRG_JAX_DISTRIBUTED_TIMEOUT_S": "60",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"}
    self.logs = [tmp_path / f"{tag}_process{i}.log" for i in range(2)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with log.open("w") as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "rrg_jax.train", f"--config={_config_file(tmp_path)}", f"--workdir={workdir}",
             *args], cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=f, stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    return self.logs[i].read_text()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait(timeout=30)

  def wait(self, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"the processes did not finish in {timeout} s:\n{self.output(0)[-3000:]}")

  def wait_for_checkpoint(self, workdir, min_step: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if done := [s for s in _steps(workdir) if s >= min_step]:
        return done[0]
      if any(p.poll() is not None for p in self.procs):
        self.kill()
        pytest.fail(f"a process exited early:\n{self.output(0)[-2000:]}\n{self.output(1)[-2000:]}")
      time.sleep(0.05)
    self.kill()
    pytest.fail(f"no checkpoint >= {min_step} after {timeout} s:\n{self.output(0)[-3000:]}")


def _rows(workdir, kind: str) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [row for row in rows if row["kind"] == kind]


def _reports(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "reports" / "val_epoch001.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_resume_and_evaluate_like_one(tmp_path):
  """Interrupted 2-process training (SIGTERM to one process, then SIGKILL to both) ends bitwise equal to an
  uninterrupted 2-process run, which follows the 1-process × 4-device run to float32 rounding: the same batches
  and the same math, but the cross-process all-reduce (Gloo) sums the 4 device shards in another order than
  XLA's in-process one, and training amplifies that rounding (at global batch 16 the step-5 loss was 1.9e-5 apart;
  at batch 8, 1.3e-7 at step 5 and 1e-4 at step 15)."""
  one = tmp_path / "one_process"
  r = _train_cli(tmp_path, one, *ARGS[:2], "--config.train.eval_splits=()")
  assert r.returncode == 0, r.stderr[-3000:]

  ref = tmp_path / "two_processes"
  cluster = _Cluster(tmp_path, ref, "uninterrupted", *ARGS)
  try:
    assert cluster.wait(timeout=240) == [0, 0], cluster.output(0)[-3000:] + cluster.output(1)[-3000:]
  finally:
    cluster.kill()
  assert _steps(ref)[-1] == STEPS
  for a, b in zip(_rows(one, "train"), _rows(ref, "train")):
    assert a["step"] == b["step"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)

  run, args = tmp_path / "interrupted", (*ARGS, "--config.train.checkpoint_every_steps=2")
  # 1. SIGTERM to process 1 only: both agree to stop after the same step, save it together and exit 143.
  cluster = _Cluster(tmp_path, run, "sigterm", *args)
  try:
    cluster.wait_for_checkpoint(run, 2, timeout=180)
    cluster.procs[1].send_signal(signal.SIGTERM)
    assert cluster.wait(timeout=120) == [128 + signal.SIGTERM] * 2, cluster.output(0)[-3000:]
  finally:
    cluster.kill()
  assert "SIGTERM: saved step" in cluster.output(0)
  stopped = _steps(run)[-1]
  assert 2 <= stopped < STEPS - 1, stopped  # a periodic checkpoint (every 2) is still ahead for the SIGKILL phase

  # 2. Resume, then both die hard after the next checkpoint.
  cluster = _Cluster(tmp_path, run, "sigkill", *args)
  try:
    cluster.wait_for_checkpoint(run, stopped + 1, timeout=180)
  finally:
    cluster.kill()
  killed = _steps(run)[-1]
  assert stopped < killed < STEPS
  # Each process saved its own Grain iterator state beside the collective train state.
  data_files = sorted(p.name for p in (run / "checkpoints" / str(killed) / "data").glob("process_*"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], data_files

  # 3. Resume to the end, evaluating val across both processes.
  cluster = _Cluster(tmp_path, run, "finish", *args)
  try:
    assert cluster.wait(timeout=240) == [0, 0], cluster.output(0)[-3000:] + cluster.output(1)[-3000:]
  finally:
    cluster.kill()
  for i in range(2):
    assert f"Resumed from {run / 'checkpoints' / str(killed)}" in cluster.output(i)
  assert _steps(run)[-1] == STEPS

  a, b = _restore_state(ref, STEPS), _restore_state(run, STEPS)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))

  # Every val record scored exactly once, in order (the padded last batch spans both processes).
  annotation = json.loads((REPO / "input_pipeline" / "sample_data" / "annotation.json").read_text())
  reports = _reports(run)
  assert [r["id"] for r in reports] == [r["id"] for r in annotation["val"][:VAL_RECORDS]]
  assert reports == _reports(ref)

  # Only process 0 writes: one epoch row (its train averages over the whole resumed epoch), one TensorBoard
  # writer per launch (3), not per process.
  assert len(_rows(run, "epoch")) == 1
  assert _rows(run, "epoch")[0] == _rows(ref, "epoch")[0]
  assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3
  assert (run / "best" / "variables").is_dir() and (run / "best" / "config.json").is_file()
