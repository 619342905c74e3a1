"""Clean output (issue 11, part 5): gloo's connection lines and other
third-party noise stay off the terminal unless --verbose; meshnet's own lines
and errors, and the last lines of a crash, always get through. Real
processes: the launcher, gloo between two processes, and two processes
started by hand."""

import os
import signal
import socket
import subprocess
import sys

import meshnet
from meshnet.noise import is_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(meshnet.__file__)))
ENV = {k: v for k, v in os.environ.items()
       if k != "XLA_FLAGS" and not k.startswith("MESHNET_")}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
MESHNET = [sys.executable, "-m", "meshnet"]
GLOO = ("[Gloo] Rank {} is connected to {} peer ranks. Expected number of connected peer "
        "ranks is : {}")
# Two processes, one device each; SGD at lr 1e30 makes the loss infinite at
# step 2, after gloo connected in step 1: the run ends with meshnet's error.
DIVERGING = ["train", "--mesh", "data=2", "--hidden", "8", "--steps", "5", "--optimizer",
             "sgd", "--lr", "1e30", "--log-every", "1", "--eval-every", "0", "--no-progress"]


def test_only_known_noise_is_noise():
  assert is_noise(GLOO.format(0, 1, 1) + "\n") and is_noise(GLOO.format(3, 7, 7))
  assert not is_noise(GLOO.format(0, 0, 1))  # a peer is missing: that is news
  assert is_noise("WARNING: All log messages before absl::InitializeLog() is called are "
                  "written to STDERR\n")
  for line in ["mesh data=2 fsdp=1 stage=1 tensor=1: 2 cpu devices, 2 processes",
               "meshnet: error: loss is nan at step 2; training stopped",
               "E1125 18:11:12.195003 22204 coordination_service.cc:1549] Shutdown barrier",
               "jax.errors.JaxRuntimeError: UNKNOWN: Gloo all-reduce failed",
               "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected "
               "peer ranks is : 1 and more", ""]:
    assert not is_noise(line), line


def test_the_filter_drops_noise_and_keeps_the_last_lines_of_a_crash():
  """What reaches file descriptor 1 (C++ writes it directly, as gloo does)
  goes through the filter process; the process then aborts: every line but
  the noise, and the unfinished last one, still arrive."""
  script = (
      "import os, sys\n"
      "from meshnet import noise\n"
      "assert noise.filter_stdout()\n"
      "print('first line', flush=True)\n"
      f"os.write(1, b'{GLOO.format(0, 1, 1)}\\n')\n"
      f"os.write(1, b'{GLOO.format(1, 0, 1)}\\n')\n"
      "sys.stdout.write('progress\\r'); sys.stdout.flush()\n"
      "os.write(1, b'last words, no line end')\n"
      "os.abort()\n")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=ENV,
                        timeout=120)
  assert proc.returncode == -signal.SIGABRT, proc.stderr.decode()[-2000:]
  assert proc.stdout.decode() == (f"first line\n{GLOO.format(1, 0, 1)}\nprogress\r"
                                  "last words, no line end")


def test_launch_relays_meshnets_lines_and_errors_without_gloo_unless_verbose():
  quiet = subprocess.run([*MESHNET, "launch", "-n", "2", "--", *MESHNET, *DIVERGING],
                         capture_output=True, text=True, env=ENV, timeout=300)
  out = quiet.stdout + quiet.stderr
  assert quiet.returncode == 1, out[-3000:]
  assert "[0] mesh data=2 fsdp=1 stage=1 tensor=1: 2 cpu devices, 2 processes" in out
  assert "[0] meshnet: error: loss is nan at step 2; training stopped" in out
  assert "meshnet launch: process" in out and "failed (exit code 1)" in out
  assert "[Gloo]" not in out, out

  verbose = subprocess.run([*MESHNET, "launch", "--verbose", "-n", "2", "--", *MESHNET,
                            *DIVERGING], capture_output=True, text=True, env=ENV, timeout=300)
  out = verbose.stdout + verbose.stderr
  assert verbose.returncode == 1, out[-3000:]
  assert f"[0] {GLOO.format(0, 1, 1)}" in out and f"[1] {GLOO.format(1, 1, 1)}" in out
  assert "[0] meshnet: error: loss is nan at step 2" in out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_processes_started_by_hand_filter_their_own_stdout_unless_verbose():
  """Two processes joined through MESHNET_* variables, no launcher: process 0
  runs plainly, process 1 with --verbose."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = {**ENV, "MESHNET_COORDINATOR": f"127.0.0.1:{port}", "MESHNET_NUM_PROCESSES": "2",
           "MESHNET_PROCESS_ID": str(i), "MESHNET_DEVICES_PER_PROCESS": "1"}
    args = [*MESHNET, "train", "--mesh", "data=2", "--hidden", "8", "--steps", "3",
            "--eval-every", "3", "--no-progress"] + (["--verbose"] if i == 1 else [])
    procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env))
  (out0, err0), (out1, err1) = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], (err0 + err1)[-3000:]
  assert "[Gloo]" not in out0 + err0, out0
  assert GLOO.format(1, 1, 1) in out1
  assert "mesh data=2 fsdp=1 stage=1 tensor=1: 2 cpu devices, 2 processes" in err0
  assert "eval @ step 3: loss" in err0  # meshnet's own lines, from process 0
