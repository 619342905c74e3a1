"""``meshnet train --profile-steps A:B DIR`` and ``meshnet profile DIR``: real
traces of real runs (one process on 2 simulated devices; 2 processes over gloo)."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import meshnet
from meshnet import cli, models, profile_report
from meshnet.hlo import HloModule, HloOp, parse_hlo, shape_bytes

ROOT = str(pathlib.Path(meshnet.__file__).resolve().parent.parent)
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, ENV.get("PYTHONPATH")]))
MESHNET = [sys.executable, "-m", "meshnet"]
HIDDEN = 16
TINY = ["--dataset", "digits", "--hidden", str(HIDDEN), "--steps", "6", "--no-progress",
        "--eval-every", "0", "--mesh", "data=2"]


def _gradient_bytes() -> int:
  """What the step's gradient exchange all-reduces per device: every float32
  gradient and the loss, packed into one bucket."""
  model = models.build("mlp", 64, 10, hidden=(HIDDEN,))
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert n_params == 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
  return 4 * (n_params + 1)


def _profile_json(directory, capsys) -> dict:
  capsys.readouterr()
  assert cli.main(["profile", str(directory), "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def _assert_gradient_all_reduce(step: dict, devices: int) -> None:
  assert step["devices"] == devices
  assert step["compute_ms"] > 0 and step["time_ms"] > 0
  reduce = step["collectives"]["all-reduce"]
  assert reduce == {"ms": pytest.approx(reduce["ms"]), "bytes": _gradient_bytes(), "calls": 1}
  assert reduce["ms"] > 0
  (exchange,) = [c for c in step["scopes"] if c["scope"] == "gradient_exchange"]
  assert (exchange["kind"], exchange["bytes"], exchange["calls"]) == (
      "all-reduce", _gradient_bytes(), 1)
  assert step["idle_ms"] >= 0 and step["overlap_ms"] >= 0
  parts = step["compute_ms"] + step["collective_ms"] - step["overlap_ms"] + step["idle_ms"]
  assert parts == pytest.approx(step["time_ms"], rel=1e-6)


def test_one_process_trace_shows_the_gradient_all_reduce(tmp_path, capsys):
  directory = tmp_path / "prof"
  assert cli.main(["train", *TINY, "--devices", "2", "--profile-steps", "3:5",
                   str(directory)]) == 0
  assert f"profile of steps 4-5 written to {directory / 'process_0'}" in capsys.readouterr().err
  (trace,) = glob.glob(str(directory / "process_0" / "plugins" / "profile" / "*" /
                           "*.xplane.pb"))

  summary = meshnet.profile_summary(str(directory))
  assert (summary.module, summary.platform, summary.processes) == ("jit_step", "cpu", 1)
  assert [(s.process, s.step) for s in summary.steps] == [(0, 4), (0, 5)]
  text = meshnet.format_profile(summary)
  assert "gradient_exchange" in text and f"{_gradient_bytes():,}" in text
  assert "waiting for the slowest peer" in text  # the CPU caveat
  # The bytes are the buffer (nccl-tests' size), not what a ring sends: says so.
  assert "bytes: each collective's buffer per device per step" in text
  assert "2(n-1)/n" in text

  report = _profile_json(directory, capsys)
  assert [s["step"] for s in report["steps"]] == [4, 5]
  assert report["units"]["bytes"].startswith("buffer per device per step")
  for step in report["steps"]:
    _assert_gradient_all_reduce(step, devices=2)

  capsys.readouterr()
  assert cli.main(["profile", str(directory)]) == 0
  out = capsys.readouterr().out
  header = next(line for line in out.splitlines() if line.startswith("process  step"))
  assert "compute ms" in header and "all-reduce ms" in header and "all-reduce bytes" in header

  # A second run into the same directory is refused; --overwrite replaces it.
  assert cli.main(["train", *TINY, "--devices", "2", "--profile-steps", "1:2",
                   str(directory)]) == 2
  assert "already holds a trace" in capsys.readouterr().err
  assert cli.main(["train", *TINY, "--devices", "2", "--overwrite", "--profile-steps", "1:2",
                   str(directory)]) == 0
  assert not os.path.exists(trace)
  assert [s.step for s in meshnet.profile_summary(str(directory)).steps] == [2]


def test_two_processes_each_trace_the_gradient_all_reduce(tmp_path, capsys):
  """A real 2-process run over gloo: each process writes its own trace, and
  `meshnet profile` finds the gradient all-reduce in both."""
  directory = tmp_path / "prof"
  proc = subprocess.run(
      MESHNET + ["launch", "-n", "2", "--", *MESHNET, "train", *TINY, "--profile-steps",
                 "3:5", str(directory)],
      capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert f"[0] profile of steps 4-5 written to {directory} " in proc.stdout + proc.stderr

  report = _profile_json(directory, capsys)
  assert report["processes"] == 2
  assert [(s["process"], s["step"]) for s in report["steps"]] == [(0, 4), (0, 5), (1, 4),
                                                                   (1, 5)]
  for step in report["steps"]:
    _assert_gradient_all_reduce(step, devices=1)

  proc = subprocess.run(MESHNET + ["profile", str(directory)], capture_output=True,
                        text=True, env=ENV, timeout=120)
  assert proc.returncode == 0, proc.stderr
  rows = [line.split() for line in proc.stdout.splitlines()]
  exchange = [r for r in rows if r[1:3] == ["gradient_exchange", "all-reduce"]]
  assert [(r[0], r[-1]) for r in exchange] == [("0", f"{_gradient_bytes():,}"),
                                               ("1", f"{_gradient_bytes():,}")]


@pytest.mark.parametrize("argv, message", [
    (["--profile-steps", "5:3", "{dir}"], "must have 0 <= A < B"),
    (["--profile-steps", "3:3", "{dir}"], "must have 0 <= A < B"),
    (["--profile-steps", "-1:3", "{dir}"], "train.profile_steps=(-1, 3)"),
    (["--profile-steps", "3-5", "{dir}"], "--profile-steps '3-5' is not a step range A:B"),
    (["--profile-steps", "3:7", "{dir}"], "reaches past the run's last step 6; choose B <= 6"),
    (["--profile-steps", "3:5", "{file}"], "is a file"),
    (["--profile-steps", "3:5", "{file}/sub"], "cannot be created"),
])
def test_bad_input_is_refused_before_any_work(argv, message, tmp_path, capsys):
  (tmp_path / "f").write_text("")
  argv = [a.format(dir=tmp_path / "prof", file=tmp_path / "f") for a in argv]
  assert cli.main(["train", *TINY, "--devices", "2", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("meshnet: error: ") and message in err, err
  assert err.count("\n") == 1 and "compiled" not in err
  assert not os.path.exists(tmp_path / "prof")


def test_profile_of_a_directory_without_a_trace_says_how_to_make_one(tmp_path, capsys):
  assert cli.main(["profile", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err == (f"meshnet: error: no profile trace in {tmp_path}: it holds no meshnet "
                 f"profile (looked for {tmp_path}/process_*/meshnet_profile.json); write one "
                 f"with meshnet train --profile-steps A:B {tmp_path}\n")


def test_config_needs_steps_and_directory_together():
  with pytest.raises(meshnet.MeshnetError, match="go together"):
    meshnet.TrainConfig(profile_steps=(3, 5))
  with pytest.raises(meshnet.MeshnetError, match="two integers"):
    meshnet.TrainConfig(profile_steps=(3, 5.0), profile_dir="d")
  args = cli.build_parser().parse_args(["train", "--profile-steps", "3:5", "runs/p"])
  train = cli.config_from_args(args).train
  assert (train.profile_steps, train.profile_dir) == ((3, 5), "runs/p")


def test_ops_that_run_at_once_on_two_threads_are_counted_as_overlap_not_as_idle():
  """The CPU runtime runs independent ops on other threads: their times add
  to more than the step (a CI run saw compute + all-reduce exceed it by
  0.06 ms). The union of the ops is the busy time; the rest of the step is
  idle, the excess is overlap; nested ops count once, in the innermost."""
  module = HloModule("jit_step", {
      "fusion": HloOp("fusion", None, 0, "jit(step)/fusion"),
      "loop": HloOp("while", None, 0, "jit(step)/loop"),
      "all-reduce": HloOp("all-reduce", "all-reduce", 400,
                          "jit(step)/gradient_exchange/all-reduce")})
  ms = 1e6  # ns
  events = {("cpu", "thread 1"): [profile_report._Event("loop", 0, 4 * ms),
                                  profile_report._Event("fusion", 1 * ms, 2 * ms),
                                  profile_report._Event("fusion", 7 * ms, 8 * ms)],
            ("cpu", "thread 2"): [profile_report._Event("all-reduce", 3 * ms, 6 * ms)]}
  step = profile_report._step_profile(0, 4, {0: events}, module, ("gradient_exchange",))
  assert step.time_ms == pytest.approx(8)
  assert step.compute_ms == pytest.approx(3 + 1 + 1)  # the loop's own 3 ms, two fusions
  assert step.collective_ms == pytest.approx(3)
  assert step.busy_ms == pytest.approx(7)  # 0-6 and 7-8
  assert (step.overlap_ms, step.idle_ms) == (pytest.approx(1), pytest.approx(1))
  assert (step.compute_ms + step.collective_ms - step.overlap_ms + step.idle_ms
          == pytest.approx(step.time_ms))
  summary = profile_report.ProfileSummary("d", "jit_step", "cpu", 1, (step,), ())
  text = meshnet.format_profile(summary)
  assert "overlap ms" in text and "compute + collectives - overlap + idle = step" in text
  lines = text.splitlines()
  (at,) = [i for i, line in enumerate(lines) if line.startswith("process  step")]
  header = [h.strip() for h in lines[at].split("  ") if h.strip()]
  cells = dict(zip(header, lines[at + 1].split()))
  assert (cells["overlap ms"], cells["idle ms"], cells["step ms"]) == ("1.000", "1.000", "8.000")


def test_hlo_bytes_of_collectives():
  text = """HloModule jit_step, is_scheduled=true

ENTRY %main (p: f32[8]) -> f32[2,8] {
  %p = f32[8]{0} parameter(0)
  %t = (f32[1,2080]{1,0}, f32[]) all-reduce(%p, %p), channel_id=1, to_apply=%add, metadata={op_name="jit(step)/train_step/gradient_exchange/psum"}
  %g = f32[2,8]{1,0} all-gather(%p), channel_id=2, dimensions={0}
  ROOT %s = bf16[4]{0} reduce-scatter(%p), channel_id=3, dimensions={0}
}
"""
  module = parse_hlo(text)
  assert module.name == "jit_step"
  assert shape_bytes("(f32[1,2080]{1,0}, f32[])") == 8324
  assert module.ops["t"][:3] == ("all-reduce", "all-reduce", 64)  # two f32[8] operands
  assert module.ops["t"].op_name == "jit(step)/train_step/gradient_exchange/psum"
  assert module.ops["g"].bytes == 64  # the gathered result
  assert module.ops["s"].bytes == 32  # the scattered operand
  assert module.ops["p"].kind is None


def test_another_programs_trace_is_named_as_such(tmp_path, capsys):
  """A plain jax.profiler trace (no meshnet HLO or steps): one line saying so."""
  directory = tmp_path / "other"
  jax.profiler.start_trace(str(directory))
  x = jax.numpy.ones((64, 64))
  (x @ x).block_until_ready()
  jax.profiler.stop_trace()
  assert glob.glob(str(directory / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert cli.main(["profile", str(directory)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "holds a jax.profiler trace of another program" in err
  assert cli.main(["profile", __file__]) == 2
  assert "is a file, not a directory" in capsys.readouterr().err
