"""Real multi-process runs: `meshnet launch` on localhost, gloo collectives."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import meshnet
from meshnet import checkpoint
from meshnet.distributed import initialize

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
MESHNET = [sys.executable, "-m", "meshnet"]
TRAIN = ["train", "--no-progress", "--eval-every", "0", "--log-every", "10"]


def _run(args, timeout=300):
  proc = subprocess.run(MESHNET + args, capture_output=True, text=True, env=ENV,
                        timeout=timeout)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return proc.stdout + proc.stderr


def _launch2(args):
  return _run(["launch", "-n", "2", "--devices-per-process", "2", "--", *MESHNET, *args])


def _digest(directory, step):
  return checkpoint.digest(checkpoint.load_params(str(directory), step))


def test_two_processes_equal_one_and_checkpoints_cross_over(tmp_path):
  """data=4 over 2 processes x 2 devices == 1 process x 4 devices, bit for
  bit; each run's checkpoint resumes in the other layout."""
  common = TRAIN + ["--mesh", "data=4", "--deterministic"]
  two, one, whole = tmp_path / "two", tmp_path / "one", tmp_path / "whole"
  out = _launch2(common + ["--steps", "20", "--checkpoint-dir", str(two)])
  assert "[0] mesh data=4 fsdp=1 stage=1 tensor=1: 4 cpu devices, 2 processes" in out
  assert "[1] mesh" not in out  # only process 0 logs the run
  _run(common + ["--devices", "4", "--steps", "20", "--checkpoint-dir", str(one)])
  assert _digest(two, 20) == _digest(one, 20)

  _run(common + ["--devices", "4", "--steps", "30", "--checkpoint-dir", str(whole)])
  out = _run(common + ["--devices", "4", "--steps", "30", "--resume", "--checkpoint-dir",
                       str(two)])  # written by 2 processes, read by 1
  assert "resumed from step 20" in out
  out = _launch2(common + ["--steps", "30", "--resume", "--checkpoint-dir", str(one)])
  assert "resumed from step 20" in out  # written by 1 process, read by 2
  assert _digest(two, 30) == _digest(whole, 30) == _digest(one, 30)


def test_pipeline_stages_spanning_two_processes_match_one(tmp_path):
  common = TRAIN + ["--mesh", "stage=4", "--hidden", "128,96,64", "--microbatches", "4",
                    "--steps", "15"]
  _launch2(common + ["--checkpoint-dir", str(tmp_path / "two")])
  _run(common + ["--devices", "4", "--checkpoint-dir", str(tmp_path / "one")])
  assert _digest(tmp_path / "two", 15) == _digest(tmp_path / "one", 15)


def test_killing_a_worker_ends_the_launch_quickly():
  launcher = subprocess.Popen(
      MESHNET + ["launch", "-n", "2", "--devices-per-process", "2", "--", *MESHNET,
                 *TRAIN, "--mesh", "data=4", "--steps", "1000000"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
  lines, pid = [], None
  for line in launcher.stdout:
    lines.append(line)
    if "process 1 started (pid" in line:
      pid = int(line.split("pid ")[1].rstrip(")\n"))
    if line.startswith("[0] compiled the train step"):
      break
  assert pid is not None, "".join(lines)
  killed = time.time()
  os.kill(pid, signal.SIGKILL)
  rest, _ = launcher.communicate(timeout=120)
  elapsed = time.time() - killed
  assert launcher.returncode != 0
  assert "meshnet launch: process 1 failed (signal SIGKILL); stopped the others" in rest
  assert elapsed < 60


def test_launch_prefixes_output_and_returns_the_failing_code():
  code = ("import os, sys; i = os.environ['MESHNET_PROCESS_ID']; "
          "print('hello from', i, os.environ['MESHNET_NUM_PROCESSES']); "
          "sys.exit(3 if i == '1' else 0)")
  proc = subprocess.run(MESHNET + ["launch", "-n", "2", "--", sys.executable, "-c", code],
                        capture_output=True, text=True, env=ENV, timeout=120)
  assert proc.returncode == 3
  assert "[0] hello from 0 2" in proc.stdout and "[1] hello from 1 2" in proc.stdout
  assert "meshnet launch: process 1 failed (exit code 3)" in proc.stdout


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  assert meshnet.initialize is initialize  # as the README writes it: meshnet.initialize()
  for name in ("MESHNET_COORDINATOR", "MESHNET_NUM_PROCESSES", "MESHNET_PROCESS_ID",
               "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert initialize() is False
  monkeypatch.setenv("MESHNET_NUM_PROCESSES", "1")
  monkeypatch.setenv("MESHNET_PROCESS_ID", "0")
  monkeypatch.setenv("MESHNET_COORDINATOR", "127.0.0.1:1")
  assert initialize() is False
  monkeypatch.delenv("MESHNET_COORDINATOR")
  monkeypatch.setenv("MESHNET_NUM_PROCESSES", "2")
  with pytest.raises(meshnet.MeshnetError, match="multi-process settings are incomplete"):
    initialize()


def test_sigterm_to_one_process_saves_the_same_step_everywhere(tmp_path):
  launcher = subprocess.Popen(
      MESHNET + ["launch", "-n", "2", "--devices-per-process", "2", "--", *MESHNET,
                 *TRAIN, "--mesh", "data=4", "--steps", "1000000", "--checkpoint-dir",
                 str(tmp_path), "--checkpoint-every", "1000000"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
  pid = None
  for line in launcher.stdout:
    if "process 1 started (pid" in line:
      pid = int(line.split("pid ")[1].rstrip(")\n"))
    if line.startswith("[0] compiled the train step"):
      break
  time.sleep(1.0)
  os.kill(pid, signal.SIGTERM)  # only process 1 is told
  rest, _ = launcher.communicate(timeout=120)
  assert launcher.returncode == 0, rest[-2000:]
  line = [l for l in rest.splitlines() if "stopped by a peer's signal after step" in l][0]
  step = int(line.split("after step ")[1].split(";")[0])
  assert [r["step"] for r in checkpoint.list_checkpoints(str(tmp_path))] == [step]


def test_launch_pins_each_process_to_its_own_core():
  out = _run(["launch", "-n", "2", "--cpus-per-process", "1", "--", sys.executable, "-c",
              "import os; print('cpus', sorted(os.sched_getaffinity(0)), "
              "os.environ['OMP_NUM_THREADS'])"])
  cpus = {line.split()[0]: line.split("cpus ")[1] for line in out.splitlines()
          if line.startswith("[") and " cpus " in line}
  available = sorted(os.sched_getaffinity(0))
  assert cpus == {"[0]": f"[{available[0]}] 1", "[1]": f"[{available[1]}] 1"}, out
  assert "started (pid" in out and f"cpus {available[0]})" in out
  proc = subprocess.run(MESHNET + ["launch", "-n", "2", "--cpus-per-process",
                                   str(len(available)), "--", "true"],
                        capture_output=True, text=True, env=ENV, timeout=60)
  assert proc.returncode == 2 and f"needs {2 * len(available)} cores" in proc.stderr


def test_launch_keeps_the_allocator_from_unmapping_unless_the_user_tunes_it():
  show = [sys.executable, "-c", "import os; print('env', os.environ.get('MALLOC_ARENA_MAX'), "
          "os.environ.get('MALLOC_MMAP_MAX_'), os.environ.get('MALLOC_TRIM_THRESHOLD_'), "
          "os.environ.get('GLIBC_TUNABLES'))"]
  out = _run(["launch", "-n", "1", "--cpus-per-process", "1", "--", *show])
  assert f"[0] env 1 0 {1 << 40} None" in out, out
  proc = subprocess.run(MESHNET + ["launch", "-n", "1", "--cpus-per-process", "1", "--", *show],
                        capture_output=True, text=True, timeout=60,
                        env={**ENV, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert "[0] env None None None glibc.malloc.hugetlb=1" in proc.stdout, proc.stdout
  out = _run(["launch", "-n", "1", "--", *show])  # not placed: left alone
  assert "[0] env None None None None" in out, out


def test_launch_gives_each_cpu_process_one_device_by_default(tmp_path):
  """`meshnet launch -n 2 -- meshnet train --mesh data=2` (each process used
  to bring 8 simulated devices), bit-identical to one process with 2."""
  args = TRAIN + ["--mesh", "data=2", "--deterministic", "--steps", "10"]
  out = _run(["launch", "-n", "2", "--", *MESHNET, *args, "--checkpoint-dir",
              str(tmp_path / "two")])
  assert "mesh data=2 fsdp=1 stage=1 tensor=1: 2 cpu devices, 2 processes" in out, out
  _run(args + ["--devices", "2", "--checkpoint-dir", str(tmp_path / "one")])
  assert _digest(tmp_path / "two", 10) == _digest(tmp_path / "one", 10)


def test_shared_memory_transport_trains_what_one_process_trains(tmp_path):
  """--grad-transport shm (2 processes, one device each) gives one process's
  parameters to float32 rounding (XLA fuses the in-graph mean into the
  update differently), dropout and gradient accumulation included, and it
  sums in process order: two runs give the same bits."""
  args = TRAIN + ["--mesh", "data=2", "--steps", "12", "--dropout", "0.2",
                  "--grad-accum", "2", "--optimizer", "adamw", "--weight-decay", "0.01"]
  before = _shm_segments()  # another run's segments on this machine are not ours
  for run in ("shm", "shm_again"):
    out = _run(["launch", "-n", "2", "--", *MESHNET, *args, "--grad-transport", "shm",
                "--checkpoint-dir", str(tmp_path / run)])
    assert "[0] compiled the train step" in out
  _run(args + ["--devices", "2", "--deterministic", "--checkpoint-dir", str(tmp_path / "one")])
  assert _digest(tmp_path / "shm", 12) == _digest(tmp_path / "shm_again", 12)
  shm_params = checkpoint.load_params(str(tmp_path / "shm"), 12)
  one_params = checkpoint.load_params(str(tmp_path / "one"), 12)
  for got, want in zip(jax.tree.leaves(shm_params), jax.tree.leaves(one_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
  leftovers = _shm_segments() - before
  assert not leftovers, leftovers  # the segment's name is removed once all attached


def _shm_segments() -> set[str]:
  return {n for n in os.listdir("/dev/shm") if n.startswith("meshnet-")}


def test_shared_memory_transport_refuses_what_it_cannot_do():
  """One process, or several devices per process: a one-line error naming
  the fix, before anything runs."""
  out = subprocess.run(MESHNET + TRAIN + ["--devices", "2", "--mesh", "data=2", "--steps", "2",
                                         "--grad-transport", "shm"],
                       capture_output=True, text=True, env=ENV, timeout=300)
  assert out.returncode != 0
  assert "--grad-transport shm averages between processes on one host" in out.stderr
  out = subprocess.run(
      MESHNET + ["launch", "-n", "2", "--devices-per-process", "2", "--", *MESHNET, *TRAIN,
                 "--mesh", "data=4", "--steps", "2", "--grad-transport", "shm"],
      capture_output=True, text=True, env=ENV, timeout=300)
  assert out.returncode != 0
  assert "one device per process" in out.stdout + out.stderr
  out = subprocess.run(MESHNET + TRAIN + ["--grad-transport", "nccl"], capture_output=True,
                       text=True, env=ENV, timeout=300)
  assert out.returncode != 0 and "optim.grad_transport='nccl' must be one of xla, shm" in (
      out.stderr)


def test_shared_memory_mean_times_out_when_a_peer_never_comes(tmp_path):
  from meshnet import shm
  name = shm.segment_name(str(tmp_path))
  mean = shm.SharedMemoryMean.create(name, 0, 2, 64, timeout=0.5)
  try:
    start = time.time()
    with pytest.raises(meshnet.MeshnetError, match=r"process\(es\) \[1\] did not arrive"):
      mean(np.ones(4, np.float32))
    assert time.time() - start < 5
  finally:
    mean.unlink()
