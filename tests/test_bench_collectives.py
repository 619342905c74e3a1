"""`meshnet bench collectives`: every collective timed on simulated devices and
across two real processes; nccl-tests' bus bandwidth factors; bad input."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import meshnet
from meshnet import cli, commbench
from meshnet.commbench import COLLECTIVES, BenchConfig, bus_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(meshnet.__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}
MESHNET = [sys.executable, "-m", "meshnet"]
QUICK = ["--iters", "3", "--warmup", "1", "--calls", "3"]
KEYS = {"collective", "axes", "devices", "processes", "dtype", "shape", "bytes", "median_s",
        "min_s", "max_s", "iqr_s", "algbw_GBps", "busbw_GBps", "platform"}
FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "broadcast": lambda n: 1.0,
           "reduce": lambda n: 1.0, "shift": lambda n: 1.0}  # the rest: (n - 1) / n


def _bench(args, capsys):
  assert cli.main(["bench", "collectives", *args]) == 0
  return capsys.readouterr()


def _check_records(records, *, n, processes, sizes):
  assert [(r["collective"], tuple(r["shape"])) for r in records] == [
      (c, s) for c in COLLECTIVES for s in sizes]
  for r in records:
    assert KEYS <= set(r), r
    assert (r["devices"], r["processes"], r["dtype"], r["platform"]) == (
        n, processes, "float32", "cpu")
    assert r["bytes"] == math.prod(r["shape"]) * 4  # these sizes split evenly
    for key in ("median_s", "min_s", "max_s", "algbw_GBps", "busbw_GBps"):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["iqr_s"] >= 0
    assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9, rel=1e-12)
    factor = FACTORS.get(r["collective"], lambda n: (n - 1) / n)(n)
    assert r["busbw_GBps"] == r["algbw_GBps"] * factor  # exactly the convention


def test_every_collective_on_eight_simulated_devices(tmp_path, capsys):
  output = tmp_path / "bench" / "c.jsonl"
  out = _bench(["--sizes", "8x8,64x64", *QUICK, "--output", str(output)], capsys).out
  lines = out.splitlines()
  assert lines[0].startswith("collectives over axes=data: devices=8 processes=1 "
                             "platform=cpu dtype=float32 mesh=data=8,")
  assert lines[1].split()[:4] == ["collective", "size", "bytes", "calls"]
  assert [line.split()[:2] for line in lines[2:]] == [
      [c, s] for c in COLLECTIVES for s in ("8x8", "64x64")]
  records = commbench.read_results(str(output))
  _check_records(records, n=8, processes=1, sizes=[(8, 8), (64, 64)])
  assert all(r["calls"] == 3 and r["iters"] == 3 for r in records)

  # --json: the same lines on stdout instead of the table
  out = _bench(["--sizes", "16x16", "--collectives", "all_reduce,shift", *QUICK, "--json"],
               capsys).out
  records = [json.loads(line) for line in out.splitlines()]
  assert [r["collective"] for r in records] == ["all_reduce", "shift"]
  assert records[0]["busbw_GBps"] == records[0]["algbw_GBps"] * 2 * 7 / 8


def test_axes_over_a_two_axis_mesh(tmp_path, capsys):
  both, inner = tmp_path / "both.jsonl", tmp_path / "stage.jsonl"
  out = _bench(["--mesh", "data=4,stage=2", "--axes", "data,stage", "--sizes", "64x64",
                *QUICK, "--output", str(both)], capsys).out
  assert "axes=data,stage: devices=8" in out
  _check_records(commbench.read_results(str(both)), n=8, processes=1, sizes=[(64, 64)])
  _bench(["--mesh", "data=4,stage=2", "--axes", "stage", "--sizes", "64x64",
          "--collectives", "all_reduce,all_gather", *QUICK, "--output", str(inner)], capsys)
  records = commbench.read_results(str(inner))
  assert [(r["devices"], r["axes"]) for r in records] == [(2, ["stage"])] * 2
  assert records[0]["busbw_GBps"] == records[0]["algbw_GBps"]  # 2(n-1)/n = 1 at n=2
  assert records[1]["busbw_GBps"] == records[1]["algbw_GBps"] * 0.5


def test_bus_factors_follow_nccl_tests():
  assert [bus_factor(c, 8) for c in COLLECTIVES] == [
      1.75, 0.875, 0.875, 1.0, 1.0, 0.875, 0.875, 0.875, 1.0]


def test_a_size_that_does_not_split_is_rounded_and_said(capsys):
  mesh = meshnet.make_mesh(devices=jax.devices()[:3], data=3)
  config = BenchConfig(collectives=("all_reduce", "all_gather", "all_to_all"),
                       sizes=((10, 10),), iters=2, warmup=1, calls=2)
  results = commbench.report(config, mesh)
  assert [r.bytes for r in results] == [400, 396, 396]
  err = capsys.readouterr().err
  assert "size 10x10 (100 elements) does not split into 3 equal chunks" in err


def test_the_loop_keeps_every_call_inside_it():
  """No collective is hoisted out of the timed loop (they would then run once,
  not once per call)."""
  mesh = meshnet.make_mesh(data=8)
  kinds = re.compile(r" (all-reduce|all-gather|reduce-scatter|all-to-all|"
                     r"collective-permute)(-start)?\(")
  for collective in COLLECTIVES:
    program = commbench._compile(collective, mesh, ("data",), 64, np.dtype("float32"))
    hlo = program.run.as_text()
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    assert " while(" in entry, collective
    assert kinds.search(hlo), collective
    assert not kinds.search(entry), (collective, entry)
    program.x.delete()


def test_two_processes_under_launch(tmp_path):
  output = tmp_path / "two.jsonl"
  proc = subprocess.run(
      MESHNET + ["launch", "-n", "2", "--", *MESHNET, "bench", "collectives", "--sizes",
                 "64x64", *QUICK, "--output", str(output)],
      capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  out = proc.stdout
  assert ("[0] collectives over axes=data: devices=2 processes=2 platform=cpu "
          "dtype=float32 mesh=data=2,") in out
  assert "[1] collectives" not in out  # process 0 reports
  rows = [line for line in out.splitlines() if re.match(r"\[0\] [a-z_]+ +64x64 ", line)]
  assert [row.split()[1] for row in rows] == list(COLLECTIVES)
  _check_records(commbench.read_results(str(output)), n=2, processes=2, sizes=[(64, 64)])


@pytest.mark.parametrize("args, message", [
    (["--sizes", "10xq"], "bad size '10xq' in --sizes '10xq'; write each size as"),
    (["--collectives", "all_reduce,allreduce"],
     "unknown collective 'allreduce'; choose from all_reduce, all_gather"),
    (["--axes", "model"], "axis 'model' in --axes is not a mesh axis; choose from data, "
     "fsdp, stage, tensor"),
    (["--axes", "stage", "--mesh", "data=8"],
     "--axes stage spans 1 device on mesh data=8,fsdp=1,stage=1,tensor=1; a collective "
     "needs at least 2: give those axes more devices, e.g. --mesh stage=8"),
    (["--devices", "1"], "the mesh has 1 device; collectives need at least 2: simulate "
     "CPU devices with --devices 8, or start processes with meshnet launch -n 2"),
    (["--dtype", "float33"], "unknown dtype 'float33'; give a JAX dtype name such as"),
    (["--dtype", "bool"], "dtype 'bool' is not numeric"),
    (["--iters", "0"], "--iters 0 must be an integer >= 1"),
    (["--sizes", "3", "--collectives", "all_gather"],
     "a buffer of 3 elements cannot be split over 8 devices for all_gather; give sizes"),
    (["--output", "/"], "--output / cannot be written"),
])
def test_bad_input_is_one_line(args, message, capsys):
  assert cli.main(["bench", "collectives", *args]) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith("meshnet: error: ") and message in captured.err
  assert captured.err.count("\n") == 1 and not captured.out
