"""Where a pipelined step's time goes, per device, on 2 pinned processes.

Runs the train step of an MLP (default 784-1024x8-10, SGD, global batch
2048) on ``stage=2`` over 2 processes, each pinned to its own core (gloo),
traces two steps with ``jax.profiler`` on both, and splits each device's
step into: the forward, backward and weight-gradient switches (the ops,
with their residual packing and weight slicing), the ``ppermute`` between
rounds (the exchange *and* the wait for the slower device), the rest of
the rounds loop (buffer stores, gradient accumulation, bookkeeping) and
everything outside it (stacking parameters, the all-gather of the
gradient, the optimizer). Event names are mapped to these parts through
the compiled program's ``jax.named_scope`` metadata.

The table also gives the step untraced (the tracer's own cost shows) and
the page faults a step on each process (fresh memory touched each step:
glibc handing XLA's buffers back to the kernel, see ``meshnet launch``).
``--part "outside rounds" --top 20`` lists one part's heaviest ops.

Run: python benchmarks/pipeline_profile.py [--schedule 1f1b] [--microbatches 8]
       [--widths 784,1024x8,10] [--batch 2048] [--remat] [--top N] [--part PART]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS = ("forward", "backward", "weight", "ppermute", "rest of rounds", "outside rounds")
TOP = 12  # ops listed per device
_SCOPES = {"pipeline_forward": "forward", "pipeline_backward": "backward",
           "pipeline_weight_gradient": "weight"}


def _widths(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    width, _, times = part.partition("x")
    out += [int(width)] * int(times or 1)
  return out


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its ``op_name`` metadata (the named scopes)."""
  return dict(re.findall(r"%(\S+) = [^\n]*?metadata=\{[^}]*?op_name=\"([^\"]+)\"", hlo_text))


def _part(op_name: str) -> str:
  for scope, part in _SCOPES.items():
    if scope in op_name:
      return part
  if "pipeline_send" in op_name:
    return "ppermute"
  return "rest of rounds" if "pipeline_rounds" in op_name else "outside rounds"


def _split(trace_dir: str, names: dict[str, str], steps: int, top: int = TOP,
           only: str | None = None) -> dict[str, float]:
  """ms per step of each part, from one process's trace: every event's own
  time (its duration less that of the events nested in it) goes to the part
  its HLO op's named scope says (an event without an op: its parent's)."""
  from jax.profiler import ProfileData

  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  ms = {part: 0.0 for part in PARTS}
  ops: dict[str, float] = {}  # "part: op" -> own ms

  def close(item):
    ms[item[1]] += item[2] / 1e6
    key = f"{item[1]}: {item[3]}"
    ops[key] = ops.get(key, 0.0) + item[2] / 1e6 / steps

  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):  # XLA's threads; not Python's
        continue
      # "wait for completion": the client thread waiting on the whole program.
      events = sorted((ev.start_ns, -ev.duration_ns, dict(ev.stats).get("hlo_op"))
                      for ev in line.events if "wait for completion" not in ev.name)
      stack: list[list] = []  # [end, part, own time, op], per thread
      for start, neg_duration, op in events:
        duration = -neg_duration
        while stack and stack[-1][0] <= start:
          close(stack.pop())
        parent = stack[-1] if stack else None
        part = (_part(names.get(op, "")) if op else
                parent[1] if parent else "outside rounds")
        if parent:
          parent[2] -= duration
        stack.append([start + duration, part, duration, op or "(thunk executor)"])
      while stack:
        close(stack.pop())
  listed = {k: v for k, v in ops.items() if only is None or k.startswith(only + ":")}
  top_ops = dict(sorted(listed.items(), key=lambda kv: -kv[1])[:top])
  return {part: value / steps for part, value in ms.items()} | {"top": top_ops}


def _worker(args) -> None:
  import jax
  import numpy as np
  import optax

  import meshnet
  from meshnet import distributed
  from meshnet.pipeline import make_pipeline
  from meshnet.sharding import batch_sharding

  distributed.initialize()
  if args.plain_matmul:  # the layers' x @ w as written, without nn.matmul's CPU rule
    meshnet.nn.matmul = lambda x, w: x @ w
  widths = _widths(args.widths)
  model = meshnet.models.mlp(widths)
  optimizer = optax.sgd(0.01)
  mesh = meshnet.make_mesh(stage=2, data=1)
  pipe = make_pipeline(model, mesh, (widths[0],), schedule=args.schedule,
                       microbatches=args.microbatches,
                       virtual_stages=2 if args.schedule == "interleaved" else 1,
                       remat=args.remat)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
  rng = np.random.default_rng(0)
  x = rng.random((args.batch, widths[0]), np.float32)
  y = rng.integers(0, widths[-1], args.batch).astype(np.int32)
  sharding = batch_sharding(mesh)
  batch = tuple(jax.make_array_from_process_local_data(sharding, a) for a in (x, y))
  names = _op_names(step.lower(state, batch).compile().as_text())
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)

  def timed(state):
    """``args.steps`` steps: (state, ms a step, page faults a step)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    began = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    wall = (time.perf_counter() - began) * 1e3 / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    return state, wall, faults

  state, plain, plain_faults = timed(state)
  trace = os.path.join(args.out, f"trace{jax.process_index()}")
  jax.profiler.start_trace(trace)
  state, wall, faults = timed(state)
  jax.profiler.stop_trace()
  with open(os.path.join(args.out, f"split{jax.process_index()}.json"), "w") as f:
    json.dump(_split(trace, names, args.steps, args.top, args.part)
              | {"wall": wall, "plain": plain, "plain_faults": plain_faults}, f)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--schedule", default="1f1b")
  parser.add_argument("--microbatches", type=int, default=8)
  parser.add_argument("--widths", default="784,1024x8,10")
  parser.add_argument("--batch", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--top", type=int, default=TOP, help=f"ops listed per device "
                      f"(default {TOP})")
  parser.add_argument("--plain-matmul", action="store_true",
                      help="dense layers as a plain x @ w (without meshnet.nn.matmul's "
                      "CPU rule for the weight gradient), to compare")
  parser.add_argument("--part", choices=PARTS, help="list only this part's ops")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return _worker(args)
  from meshnet.launch import placement_environment
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with tempfile.TemporaryDirectory() as out:
    procs = []
    for rank in range(2):
      env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
      env.update(MESHNET_COORDINATOR=f"127.0.0.1:{port}", MESHNET_NUM_PROCESSES="2",
                 MESHNET_PROCESS_ID=str(rank), MESHNET_DEVICES_PER_PROCESS="1",
                 PYTHONPATH=ROOT)
      env.update(placement_environment(1, env))  # as meshnet launch --cpus-per-process 1
      cpus = sorted(os.sched_getaffinity(0))
      procs.append(subprocess.Popen(
          [sys.executable, __file__, "--worker", "--out", out] + (argv or sys.argv[1:]),
          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
          preexec_fn=lambda rank=rank: os.sched_setaffinity(0, {cpus[rank % len(cpus)]})))
    # Progress on stderr: the workers report nothing until they are done.
    print(f"pipeline_profile: 2 pinned worker processes: compiling, warming up, tracing "
          f"{args.steps} steps ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    for proc in procs:
      _, err = proc.communicate(timeout=1200)
      if proc.returncode:
        sys.exit(f"worker failed:\n{err[-3000:]}")
    print(f"pipeline_profile: workers done in {time.perf_counter() - began:.0f} s",
          file=sys.stderr, flush=True)
    splits = [json.load(open(os.path.join(out, f"split{r}.json"))) for r in range(2)]
  print(f"{args.schedule}, M={args.microbatches}, MLP {args.widths}, batch {args.batch}, "
        f"stage=2 over 2 pinned processes{' (remat)' if args.remat else ''}"
        f"{' (plain x @ w)' if args.plain_matmul else ''}: ms per step\n")
  print("| part | stage 0 | stage 1 |\n| --- | --- | --- |")
  for part in PARTS:
    print(f"| {part} | {splits[0][part]:.1f} | {splits[1][part]:.1f} |")
  accounted = [sum(split[p] for p in PARTS) for split in splits]
  print(f"| in no XLA event (dispatch, waits outside ops) | "
        f"{splits[0]['wall'] - accounted[0]:.1f} | {splits[1]['wall'] - accounted[1]:.1f} |")
  print(f"| step (wall clock, traced) | {splits[0]['wall']:.1f} | {splits[1]['wall']:.1f} |")
  print(f"| step (wall clock, not traced) | {splits[0]['plain']:.1f} | "
        f"{splits[1]['plain']:.1f} |")
  print(f"| page faults a step, not traced (first touches of fresh memory) | "
        f"{splits[0]['plain_faults']:,.0f} | {splits[1]['plain_faults']:,.0f} |")
  for rank, split in enumerate(splits):
    print(f"\nstage {rank}, the {args.top} {args.part + ' ' if args.part else ''}ops with "
          f"the most own time (ms per step):")
    for name, value in split["top"].items():
      print(f"  {value:7.1f}  {name}")


if __name__ == "__main__":
  main()
