"""MFU of meshnet's GPT train step on one accelerator (a GPU or a TPU chip).

For each configuration (``--vocab`` x ``--attention`` x ``--batch-size``) it
builds ``meshnet.models.gpt(--size)``, ``meshnet.init_train_state`` and
``meshnet.make_train_step(precision="bf16")`` (AdamW, float32 master
parameters and optimizer state) on a one-device mesh, feeds random token
batches, and times ``--steps`` steps after ``--warmup``. It prints one
markdown row per configuration:

- tokens/s and ms/step;
- model TFLOP/s: tokens/s times ``6N + 12LHQT`` per token
  (:mod:`meshnet.flops`; nanoGPT's and PaLM's convention, the full ``T x T``
  attention square counted even where a causal kernel skips half);
- MFU against the device's datasheet dense-bf16 peak
  (:data:`meshnet.flops.PEAK_FLOPS`, or ``--peak-flops``) and against a bf16
  8192^3 matmul timed in the same run (what this chip reaches at best);
- the compiled step's temporary bytes.

``--jit-baseline`` adds, for the first configuration, a hand-written
``jax.jit`` bf16 step of the same model (no meshnet step code), timed
alternately with meshnet's, and prints their ratio.

Run (on the accelerator machine):
  python benchmarks/gpt_mfu.py --size small --vocab 256,50304 --attention plain,fused
On CPU it runs too (``--size tiny``), but there is no datasheet peak: give
``--peak-flops`` for an MFU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshnet  # noqa: E402
from gpt_steps import plain_step, timed  # noqa: E402  (same directory)
from meshnet import flops  # noqa: E402
from meshnet.models.gpt import gpt_config  # noqa: E402
from meshnet.sharding import batch_sharding  # noqa: E402

LR = 3e-4


def _tokens(batch_size: int, context: int, vocab: int, seed: int = 0):
  seq = np.random.default_rng(seed).integers(0, vocab, (batch_size, context + 1))
  return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


def _text_tokens(batch_size: int, context: int):
  """A batch of windows of the embedded corpus (bytes of English text)."""
  data = meshnet.data.text(context=context)
  return data.x_train[:batch_size], data.y_train[:batch_size]


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
  """FLOP/s of a bf16 ``n x n x n`` matmul on the first device (best of 3 timings)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)

  @jax.jit
  def chain(a, b):
    def body(_, c):
      return (c @ b) * jnp.bfloat16(1e-2)
    return jax.lax.fori_loop(0, reps, body, a)

  jax.block_until_ready(chain(a, b))
  best = float("inf")
  for _ in range(3):
    begin = time.perf_counter()
    jax.block_until_ready(chain(a, b))
    best = min(best, time.perf_counter() - begin)
  return 2.0 * n**3 * reps / best


def measure(size: str, vocab: int, attention: str, batch_size: int, steps: int,
            warmup: int, remat: bool, jit_baseline: bool, tie: bool = False,
            embedding: str = "auto", text: bool = False) -> dict:
  """One configuration: seconds per step, XLA's FLOPs and temp bytes (and the
  plain ``jax.jit`` step's seconds with ``jit_baseline``)."""
  options = dict(vocab=vocab, attention=attention, remat=remat, tie_embeddings=tie,
                 embedding=embedding)
  cfg = gpt_config(size, **options)
  model = meshnet.models.gpt(size, **options)
  optimizer = optax.adamw(LR)
  device = jax.devices()[0]
  mesh = meshnet.make_mesh(data=1, devices=[device])
  x, y = _text_tokens(batch_size, cfg.context) if text else _tokens(batch_size, cfg.context,
                                                                      vocab)
  batch = tuple(jax.device_put(a, batch_sharding(mesh)) for a in (x, y))
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  step = meshnet.make_train_step(model, optimizer, mesh, donate=True, precision="bf16")
  begin = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - begin
  temp = compiled.memory_analysis().temp_size_in_bytes
  runs = {"meshnet": (lambda c: compiled(c[0], batch), (state, None))}
  if jit_baseline:
    params = jax.device_put(jax.device_get(state.params), device)
    plain = plain_step(model, optimizer, jnp.bfloat16)
    plain_batch = tuple(jax.device_put(a, device) for a in (x, y))
    runs["jax.jit"] = (lambda c: plain(c[0], c[1], *plain_batch),
                       (params, optimizer.init(params), None))
  carries, best = {}, {}
  for name, (fn, carry) in runs.items():
    carries[name], _ = timed(fn, carry, warmup)
    best[name] = float("inf")
  for _ in range(2):  # two alternating rounds
    for name, (fn, _) in runs.items():
      carries[name], seconds = timed(fn, carries[name], steps)
      best[name] = min(best[name], seconds)
  loss = float(carries["meshnet"][1]["loss"])
  return {"cfg": cfg, "seconds": best, "temp": temp,
          "compile_s": compile_s, "loss": loss,
          "params": sum(a.size for a in jax.tree.leaves(state.params))}


def _list(kind, minimum: int | None = None):
  """An argparse type: comma-separated values of ``kind`` (ints at least
  ``minimum``), checked when the flags are parsed."""
  def parse(text: str):
    try:
      values = [kind(v) for v in text.split(",")]
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                       f"{kind.__name__}") from None
    if minimum is not None and any(v < minimum for v in values):
      raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= {minimum}")
    return values
  return parse


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="small")
  parser.add_argument("--vocab", type=_list(int, 1), default=[50304, 256],
                      help="vocabularies, comma-separated (256: bytes; 50304: GPT-2's "
                      "50257 padded to a multiple of 64)")
  parser.add_argument("--attention", type=_list(str), default=["fused", "plain"])
  parser.add_argument("--batch-size", type=_list(int, 1), default=[16],
                      help="sequences per step, comma-separated")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round (>= 1)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
  parser.add_argument("--remat", action="store_true", help="checkpoint each block")
  parser.add_argument("--tie-embeddings", action="store_true",
                      help="the head is the token table (GPT-2: 124M at vocab 50304)")
  parser.add_argument("--embedding", type=_list(str), default=["auto"],
                      help="auto, gather and/or onehot (meshnet.nn.embedding)")
  parser.add_argument("--text", action="store_true",
                      help="batches of the embedded corpus (bytes) rather than random tokens")
  parser.add_argument("--jit-baseline", action="store_true")
  parser.add_argument("--peak-flops", type=float, default=None,
                      help="peak FLOP/s of the device for the MFU column (default: the "
                      "datasheet's, meshnet.flops.PEAK_FLOPS)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    parser.error(f"--steps {args.steps} and --warmup {args.warmup} must be >= 1")
  if args.peak_flops is not None and not args.peak_flops > 0:
    parser.error(f"--peak-flops {args.peak_flops} must be > 0")
  if args.text and min(args.vocab) < 256:
    parser.error(f"--text feeds bytes (ids up to 255): --vocab {min(args.vocab)} is too "
                 "small; use 256 or more")

  device = jax.devices()[0]
  peak = args.peak_flops or flops.peak_flops()
  source = "--peak-flops" if args.peak_flops else "datasheet"
  measured = matmul_peak() if device.platform != "cpu" else None
  print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
        f"peak ({source}) {peak / 1e12 if peak else float('nan'):.4g} TFLOP/s; bf16 8192^3 "
        f"matmul {measured / 1e12 if measured else float('nan'):.0f} TFLOP/s", flush=True)
  print()
  header = ["size", "vocab", "params", "attention, embedding", "batch x T", "ms/step",
            "tokens/s", "model TFLOP/s", f"MFU ({source})", "MFU (matmul)", "temp GiB",
            "loss"]
  print("| " + " | ".join(header) + " |")
  print("|" + " --- |" * len(header), flush=True)
  baseline = args.jit_baseline
  grid = [(v, a, b, e) for v in args.vocab for a in args.attention
          for b in args.batch_size for e in args.embedding]
  failed = 0
  for vocab, attention, batch_size, embedding in grid:
    name = f"{args.size}{' tied' if args.tie_embeddings else ''}"
    try:
      r = measure(args.size, vocab, attention, batch_size, args.steps, args.warmup,
                  args.remat, baseline, args.tie_embeddings, embedding, args.text)
    except Exception as e:  # one failing configuration does not hide the others
      failed += 1
      cells = [name, str(vocab), "-", f"{attention}, {embedding}", str(batch_size)]
      cells += [f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"]
      print("| " + " | ".join(cells + ["-"] * (len(header) - len(cells))) + " |", flush=True)
      continue
    cfg, s = r["cfg"], r["seconds"]["meshnet"]
    tokens_per_s = batch_size * cfg.context / s
    per_token = flops.gpt_flops_per_token(cfg)
    achieved = tokens_per_s * per_token
    mfu = f"{achieved / peak:.1%}" if peak else "-"
    mfu_m = f"{achieved / measured:.1%}" if measured else "-"
    print(f"| {name} | {vocab} | {r['params'] / 1e6:.1f}M | {attention}, {embedding} | "
          f"{batch_size} x {cfg.context} | {s * 1e3:.1f} | {tokens_per_s:,.0f} | "
          f"{achieved / 1e12:.1f} | {mfu} | "
          f"{mfu_m} | {r['temp'] / 2**30:.2f} | {r['loss']:.3f} |", flush=True)
    if baseline:
      b = r["seconds"]["jax.jit"]
      print(f"  hand-written jax.jit bf16 step: {b * 1e3:.1f} ms; meshnet / jax.jit = "
            f"{s / b:.3f} (compile {r['compile_s']:.0f} s)", flush=True)
      baseline = False
  if failed:
    print(f"{failed} of {len(grid)} configurations failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
