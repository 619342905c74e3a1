"""`meshnet launch --max-restarts N`: real processes, gloo, a worker SIGKILLed."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import meshnet
from meshnet.launch import resume_command, train_command

ROOT = str(pathlib.Path(meshnet.__file__).resolve().parent.parent)
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, ENV.get("PYTHONPATH")]))
MESHNET = [sys.executable, "-m", "meshnet"]
# A tiny model: ~20 ms a step on 2 processes, so 200 steps after the first
# checkpoint leave seconds to kill a worker mid-run.
TRAIN = MESHNET + ["train", "--no-progress", "--eval-every", "0", "--mesh", "data=2",
                   "--deterministic", "--hidden", "16", "--steps", "220",
                   "--checkpoint-every", "20"]


def _launch(args, ck, max_restarts=1):
  return subprocess.Popen(
      MESHNET + ["launch", "-n", "2", "--max-restarts", str(max_restarts), "--", *TRAIN,
                 "--checkpoint-dir", str(ck), *args],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _digest(ck) -> str:
  out = subprocess.run(MESHNET + ["inspect", str(ck), "--digest"], capture_output=True,
                       text=True, env=ENV, timeout=120, check=True).stdout
  return re.search(r"^digest ([0-9a-f]{64})$", out, re.M).group(1)


def _kill_after_first_checkpoint(launcher, ck, victim=1) -> list[str]:
  """Reads the launcher's output until process ``victim`` started, waits for
  step 20's complete directory, SIGKILLs the victim; returns the lines read."""
  lines, pid = [], None
  for line in launcher.stdout:
    lines.append(line)
    if f"process {victim} started (pid" in line:
      pid = int(line.split("pid ")[1].rstrip(")\n"))
      break
  assert pid is not None, "".join(lines)
  deadline = time.time() + 120
  while not (ck / "20").is_dir():
    assert time.time() < deadline and launcher.poll() is None, "".join(lines)
    time.sleep(0.02)
  os.kill(pid, signal.SIGKILL)
  return lines


def test_a_killed_worker_restarts_from_its_checkpoint_bit_identical(tmp_path):
  """The kill lands mid-run; the group restarts once with --resume (not
  --overwrite again) and ends where a run that never failed ends; that run,
  under the same launcher, never restarts."""
  start = time.time()
  launcher = _launch(["--overwrite"], tmp_path / "ck")
  lines = _kill_after_first_checkpoint(launcher, tmp_path / "ck")
  rest, _ = launcher.communicate(timeout=300)
  out = "".join(lines) + rest
  print(f"killed and restarted: {time.time() - start:.1f}s")
  assert launcher.returncode == 0, out[-3000:]
  match = re.search(r"^meshnet launch: process 1 was killed by SIGKILL; restart 1 of 1 from "
                    rf"the newest checkpoint in {tmp_path / 'ck'} \(step (\d+)\)$", out, re.M)
  assert match, out[-3000:]
  step = int(match.group(1))
  assert 20 <= step < 220, step  # killed mid-run, after the first checkpoint
  assert f"[0] resumed from step {step} of {tmp_path / 'ck'}" in out
  assert out.count("process 1 started (pid") == 2
  assert "meshnet launch: completed after 1 restart" in out
  assert "--overwrite: checkpoints" not in out  # the restart continued, it did not replace

  start = time.time()
  clean = _launch([], tmp_path / "clean")
  out, _ = clean.communicate(timeout=300)
  print(f"clean run: {time.time() - start:.1f}s")
  assert clean.returncode == 0, out[-3000:]
  assert "restart" not in out and out.count("process 1 started (pid") == 1
  assert _digest(tmp_path / "ck") == _digest(tmp_path / "clean")


def test_used_up_restarts_end_with_the_last_failure():
  """Every attempt fails: 1 + N starts, one restart line each, then the last
  failure's line and its status. A command that is not meshnet train is run
  again as it was, each time on a fresh coordinator port."""
  code = ("import os, sys; i = os.environ['MESHNET_PROCESS_ID']; "
          "print('port', os.environ['MESHNET_COORDINATOR'].split(':')[1], "
          "'restart', os.environ['MESHNET_RESTART_COUNT']); sys.exit(3 if i == '1' else 0)")
  proc = subprocess.run(MESHNET + ["launch", "-n", "2", "--max-restarts", "2", "--",
                                   sys.executable, "-c", code],
                        capture_output=True, text=True, env=ENV, timeout=120)
  out = proc.stdout
  assert proc.returncode == 3, out + proc.stderr
  restarts = re.findall(r"^meshnet launch: process 1 exited with 3; restart (\d) of 2 with the "
                        r"same command \(not meshnet train: nothing to resume\)$", out, re.M)
  assert restarts == ["1", "2"], out
  # Process 0 exits at once, or is stopped if process 1 fails first (a loaded machine).
  assert re.fullmatch(
      r"meshnet launch: process 1 failed \(exit code 3\); stopped the others "
      r"\(0: (exit code 0|signal SIGTERM)\); restarts used up \(2 of 2\)",
      out.strip().splitlines()[-1]), out
  ports = re.findall(r"^\[1\] port (\d+) restart (\d)$", out, re.M)
  assert [r for _, r in ports] == ["0", "1", "2"], out
  assert len({p for p, _ in ports}) == 3, ports


def test_a_train_command_without_a_checkpoint_dir_restarts_from_scratch():
  proc = subprocess.run(
      MESHNET + ["launch", "-n", "2", "--max-restarts", "1", "--", *MESHNET, "train",
                 "--steps", "0"],  # refused at once: exit 2
      capture_output=True, text=True, env=ENV, timeout=120)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert re.search(r"^meshnet launch: process \d exited with 2; restart 1 of 1 from scratch "
                   r"\(the command has no --checkpoint-dir\)$", proc.stdout, re.M), proc.stdout
  assert proc.stdout.strip().splitlines()[-1].endswith("restarts used up (1 of 1)")


def test_sigterm_to_the_launcher_is_not_restarted(tmp_path):
  launcher = subprocess.Popen(
      MESHNET + ["launch", "-n", "2", "--max-restarts", "3", "--", sys.executable, "-c",
                 "import time; print('up', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
  seen = 0
  for line in launcher.stdout:
    seen += line.endswith(" up\n")
    if seen == 2:
      break
  launcher.send_signal(signal.SIGTERM)
  out, _ = launcher.communicate(timeout=60)
  assert launcher.returncode == 128 + signal.SIGTERM, out
  assert "restart" not in out and "started" not in out  # nothing started again


def test_restart_commands_resume_and_never_overwrite_again():
  ck = ["--checkpoint-dir", "runs/ck"]
  assert resume_command(["meshnet", "train", *ck, "--overwrite", "--steps", "9"]) == [
      "meshnet", "train", *ck, "--steps", "9", "--resume"]
  assert resume_command([*MESHNET, "train", "--checkpoint-dir=runs/ck", "--overw"]) == [
      *MESHNET, "train", "--checkpoint-dir=runs/ck", "--resume"]
  assert resume_command(["meshnet", "train", "--resume", *ck]) == [
      "meshnet", "train", "--resume", *ck]  # not twice
  info = train_command([*MESHNET, "train", *ck, "--overwrite"])
  assert (info.checkpoint_dir, info.resume, info.overwrite) == ("runs/ck", False, True)
  assert train_command(["meshnet", "train"]).checkpoint_dir is None
  assert train_command([sys.executable, "train.py", *ck]) is None
  assert train_command(["meshnet", "inspect", "runs/ck"]) is None


def test_max_restarts_must_not_be_negative():
  proc = subprocess.run(MESHNET + ["launch", "-n", "2", "--max-restarts", "-1", "--", "true"],
                        capture_output=True, text=True, env=ENV, timeout=60)
  assert proc.returncode == 2
  assert "--max-restarts -1 must be >= 0" in proc.stderr
