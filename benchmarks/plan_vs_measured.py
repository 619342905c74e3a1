"""The forecast against reality: ``meshnet plan``'s step time and speedup beside
the same steps measured on this machine's real processes.

Each configuration is planned first (``meshnet plan --json --device-kind cpu``,
run pinned to one core with one thread, as the workers run, so the matmul
and update rates it times here are a worker's), then measured with
``benchmarks/scaling.py``'s workers: every process pinned to its own core,
one thread, gloo between processes, one process and two alternating, best
of R rounds:

* **Data parallel**: MLP 784-512-256-128-10, Adam, global batch 256 and
  1024, ``data=2`` over 2 processes against one process.
* **Pipeline**: MLP 784-1024x8-10, SGD, global batch 2048, ``stage=2`` over
  2 processes (1F1B and GPipe, M = 4 and 8) against the unpipelined step on
  one process.

The table gives predicted and measured milliseconds per step on 1 and 2
processes, the predicted and measured speedup, and each prediction's
relative error (``predicted / measured - 1``). The link figures are the
plan's CPU defaults (DESIGN.md's gloo measurements) unless ``--link-file``
gives the JSON lines of ``meshnet bench collectives``.

Run: python benchmarks/plan_vs_measured.py [--quick] [--link-file F.jsonl]
       [--rounds R] [--only dp|pipeline]
(--quick: batch 256 data parallel and a small 1F1B pipeline, 1 round.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]

import scaling  # noqa: E402  (same directory: the pinned worker groups)

FULL = (scaling.PipelineWork((784,) + (1024,) * 8 + (10,), 2048, ("1f1b", "gpipe"), (4, 8),
                             steps=5),
        scaling.DataParallelWork((784, 512, 256, 128, 10), (256, 1024), steps=50))
QUICK = (scaling.PipelineWork((784, 256, 256, 256, 10), 512, ("1f1b",), (4,), steps=5),
         scaling.DataParallelWork((784, 512, 256, 128, 10), (256,), steps=20))


def _plan(flags: list[str], link_file: str | None) -> dict:
  """``meshnet plan --json`` for ``flags``, run as a worker runs: pinned to
  the first core, one thread, one CPU device."""
  from meshnet.launch import cpu_sets, placement_environment

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(placement_environment(1, env))
  env.update(JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])))
  command = [sys.executable, "-m", "meshnet", "plan", *flags, "--json", "--no-xla",
             "--device-kind", "cpu", "--max-devices", "2"]
  if link_file:
    command += ["--link-file", link_file]
  cores = cpu_sets(1, 1)[0]
  proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                        preexec_fn=lambda: os.sched_setaffinity(0, cores))
  if proc.returncode:
    raise SystemExit(f"meshnet plan {' '.join(flags)} failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout)


def _predicted(result: dict) -> tuple[float, float]:
  """Seconds per step on 1 and on 2 devices, from the plan's projection."""
  rows = {row["devices"]: row for row in result["scaling"]}
  return rows[1]["step_s"], rows[2]["step_s"]


def _row(label: str, predicted: tuple[float, float], measured: tuple[float, float]) -> list[str]:
  (p1, p2), (m1, m2) = predicted, measured
  error = lambda p, m: f"{p / m - 1:+.0%}"
  return [label, f"{p1 * 1e3:.1f}", f"{m1 * 1e3:.1f}", error(p1, m1), f"{p2 * 1e3:.1f}",
          f"{m2 * 1e3:.1f}", error(p2, m2), f"{p1 / p2:.2f}", f"{m1 / m2:.2f}",
          error(p1 / p2, m1 / m2)]


HEADER = ["configuration", "plan ms 1p", "measured ms 1p", "error", "plan ms 2p",
          "measured ms 2p", "error", "plan speedup", "measured speedup", "error"]


def _layers(widths) -> str:
  return ",".join(map(str, widths))


def _dp_rows(work: scaling.DataParallelWork, rounds: int, link_file: str | None) -> list:
  plans = {b: _plan(["--layers", _layers(work.widths), "--optimizer", "adam",
                     "--batch-size", str(b), "--mesh", "data=2"], link_file)
           for b in work.batches}
  specs = {"one": ("meshnet", 1, work), "two": ("meshnet", 2, work)}
  order = [(name, str(b)) for b in work.batches for name in specs]
  best, _, _ = scaling._measure(specs, order, work.steps, rounds)
  return [_row(f"data=2, batch {b}", _predicted(plans[b]),
               (best[("one", str(b))], best[("two", str(b))]))
          for b in work.batches], plans


def _pipeline_rows(work: scaling.PipelineWork, rounds: int, link_file: str | None) -> list:
  plans = {(name, m): _plan(["--layers", _layers(work.widths), "--optimizer", "sgd",
                             "--batch-size", str(work.batch), "--mesh", "stage=2",
                             "--schedule", name, "--microbatches", str(m)], link_file)
           for m in work.microbatches for name in work.schedules}
  specs = {"one": ("unpipelined", 1, work), "two": ("pipelined", scaling.STAGES, work)}
  order = []
  for m in work.microbatches:
    order += [("one", "full")] + [("two", f"{name}/{m}") for name in work.schedules]
  best, _, _ = scaling._measure(specs, order, work.steps, rounds)
  rows = [_row(f"stage=2 {name} M={m}, batch {work.batch}", _predicted(plans[(name, m)]),
               (best[("one", "full")], best[("two", f"{name}/{m}")]))
          for m in work.microbatches for name in work.schedules]
  return rows, plans


def _rates(plans: dict) -> str:
  """The figures the plans used (the last plan's: each times the rates anew)."""
  device = list(plans.values())[-1]["device"]
  rates = ", ".join(f"{rate / 1e9:.0f} at {rows}" for rows, rate in device["flops_by_rows"])
  costs = "; ".join(f"{name} {c['latency_s'] * 1e3:.2f} ms + {c['bandwidth_Bps'] / 1e9:.2g} GB/s"
                    for name, c in device["link"].items())
  return (f"Plan figures: matmul GFLOP/s by rows {rates}; update "
          f"{device['memory_bandwidth'] / 1e9:.1f} GB/s; {costs} ({device['link_source']}).")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one small case of each, 1 round")
  parser.add_argument("--rounds", type=int, help="rounds, keep the best (default 3; --quick 1)")
  parser.add_argument("--link-file", help="JSON lines of `meshnet bench collectives` for the "
                      "plan's link figures (default: its CPU defaults)")
  parser.add_argument("--only", choices=["dp", "pipeline"])
  args = parser.parse_args(argv)
  began = time.perf_counter()
  pipeline, dp = QUICK if args.quick else FULL
  rounds = args.rounds or (1 if args.quick else 3)
  import jax
  print(f"jax {jax.__version__}; every process pinned to its own core, 1 thread, gloo; "
        f"best of {rounds} rounds; plans from `meshnet plan --device-kind cpu` pinned "
        "likewise\n")
  rows = []
  if args.only in (None, "dp"):
    dp_rows, plans = _dp_rows(dp, rounds, args.link_file)
    rows += dp_rows
    print(f"Data parallel: MLP {scaling._widths(dp.widths)}, Adam, {dp.steps} steps per "
          f"round. {_rates(plans)}\n")
  if args.only in (None, "pipeline"):
    pipe_rows, plans = _pipeline_rows(pipeline, rounds, args.link_file)
    rows += pipe_rows
    print(f"Pipeline: MLP {scaling._widths(pipeline.widths)}, SGD, {pipeline.steps} steps "
          f"per round. {_rates(plans)}\n")
  print(scaling._table(HEADER, rows) + "\n")
  print(f"took {time.perf_counter() - began:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
