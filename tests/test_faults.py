"""Faults on real processes started without `meshnet launch`: a peer that dies."""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import meshnet
from meshnet import checkpoint
from meshnet.faults import EXIT_PEER_FAILED, SAVE_GRACE_SECONDS, peer_failure_cause

ROOT = str(pathlib.Path(meshnet.__file__).resolve().parent.parent)
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, ENV.get("PYTHONPATH")]))
TRAIN = [sys.executable, "-m", "meshnet", "train", "--dataset", "digits", "--mesh", "data=2",
         "--devices", "1", "--steps", "100000", "--no-progress", "--eval-every", "0"]
C_DUMP = re.compile(r"\*\*\* Check failure stack trace|^\s*@\s+0x[0-9a-f]+", re.M)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(args, tmp_path):
  """Two `meshnet train` processes joined by the MESHNET_* variables only."""
  port, procs = _free_port(), []
  for i in range(2):
    env = {**ENV, "MESHNET_COORDINATOR": f"127.0.0.1:{port}", "MESHNET_NUM_PROCESSES": "2",
           "MESHNET_PROCESS_ID": str(i)}
    out = open(tmp_path / f"out{i}", "w")
    err = open(tmp_path / f"err{i}", "w")
    procs.append(subprocess.Popen(TRAIN + args, env=env, stdout=out, stderr=err))
  return procs


def _wait_for(path: pathlib.Path, procs, timeout=120):
  deadline = time.time() + timeout
  while not path.exists():
    assert time.time() < deadline, f"{path} never appeared"
    assert all(p.poll() is None for p in procs), "a process ended early"
    time.sleep(0.1)


@pytest.mark.parametrize("victim", [1, 0])  # 0 also hosts the coordination service
def test_a_killed_peer_ends_the_other_with_one_line(tmp_path, victim):
  ck = tmp_path / "ck"
  procs = _start_two(["--checkpoint-dir", str(ck), "--checkpoint-every", "50"], tmp_path)
  try:
    _wait_for(ck / "50", procs)
    time.sleep(0.5)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.time()
    survivor = procs[1 - victim]
    code = survivor.wait(timeout=90)
    elapsed = time.time() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  err = (tmp_path / f"err{1 - victim}").read_text()
  out = (tmp_path / f"out{1 - victim}").read_text()
  last = err.strip().splitlines()[-1]
  assert code == EXIT_PEER_FAILED, err[-3000:]
  assert elapsed < 60, elapsed
  print(f"victim {victim}: the survivor exited {elapsed:.1f}s after the kill")
  steps = [row["step"] for row in checkpoint.list_checkpoints(str(ck))]
  match = re.fullmatch(
      rf"meshnet: error: process {victim} of 2 stopped responding during step (\d+) "
      rf"\((gloo|coordination service)[^)]*\); newest checkpoint: step (\d+) in {ck}; "
      r"continue with --resume", last)
  assert match, last
  assert int(match.group(3)) == steps[-1] and int(match.group(1)) > steps[-1]
  assert not C_DUMP.search(err + out), err[-3000:]
  assert "Traceback" not in err
  # No unfinished save looks complete, and the newest complete step restores.
  assert all(p.name.isdigit() or "orbax-checkpoint-tmp" in p.name or p.name.startswith(".")
             for p in ck.iterdir()), sorted(p.name for p in ck.iterdir())
  params = checkpoint.load_params(str(ck), steps[-1])
  leaves = jax.tree.leaves(params)
  assert leaves and all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)


def test_peer_failure_causes_are_recognised_and_others_are_not():
  gloo = RuntimeError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/"
                      "pair.cc:538] Read error [127.0.0.1]:19843: Connection reset by peer")
  assert peer_failure_cause(gloo) == "gloo: connection reset by peer"
  wrapped = TimeoutError("Timed out while waiting for async_write_complete barrier.")
  wrapped.__cause__ = RuntimeError("INTERNAL: Barrier failed because: task is set to ERROR: "
                                   "UNAVAILABLE: Task 1 heartbeat timeout.")
  assert peer_failure_cause(wrapped) == "coordination service: no heartbeat"
  assert peer_failure_cause(ValueError("operands could not be broadcast")) is None
  assert peer_failure_cause(MemoryError()) is None


def test_a_stuck_peer_ends_the_other_at_the_step_timeout(tmp_path):
  ck = tmp_path / "ck"
  procs = _start_two(["--checkpoint-dir", str(ck), "--checkpoint-every", "50",
                      "--step-timeout", "3"], tmp_path)
  try:
    _wait_for(ck / "50", procs)
    procs[1].send_signal(signal.SIGSTOP)  # alive, but never answers again
    stopped = time.time()
    code = procs[0].wait(timeout=60)
    elapsed = time.time() - stopped
  finally:
    procs[1].send_signal(signal.SIGCONT)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  err = (tmp_path / "err0").read_text()
  last = err.strip().splitlines()[-1]
  print(f"stuck peer: the other exited {elapsed:.1f}s after SIGSTOP")
  assert code == EXIT_PEER_FAILED, err[-3000:]
  # The watchdog counts from the last finished step (before the SIGSTOP) and
  # looks every 0.3 s: the wait it reports is at least the limit; the wall
  # clock is at most the limit, a look, the save's grace and slack for a
  # loaded machine.
  waited = float(re.search(r"did not finish in ([\d.]+)s", last)[1])
  assert waited >= 3.0, last
  assert elapsed < 3 + 0.3 + SAVE_GRACE_SECONDS + 20, elapsed
  steps = [row["step"] for row in checkpoint.list_checkpoints(str(ck))]
  assert re.fullmatch(
      r"meshnet: error: step \d+ did not finish in [\d.]+s \(3s is --step-timeout\); a peer "
      rf"process is stuck or too slow; newest checkpoint: step {steps[-1]} in {ck}; "
      r"continue with --resume", last), last
  assert not C_DUMP.search(err), err[-3000:]


def test_step_timeout_is_a_flag_and_a_config_field():
  from meshnet.cli import build_parser, config_from_args
  args = build_parser().parse_args(["train", "--step-timeout", "2.5"])
  assert config_from_args(args).train.step_timeout == 2.5
  args = build_parser().parse_args(["train", "--step-timeout", "auto"])
  assert config_from_args(args).train.step_timeout is None
  with pytest.raises(meshnet.MeshnetError, match=r"train.step_timeout=-1 must be a finite"):
    meshnet.TrainConfig(step_timeout=-1)
