"""The ``meshnet`` command. It only parses flags into a :class:`Config` and
calls :func:`meshnet.train.run`; every flag is a field of that config.

    meshnet train                      # MLP on digits, 8 simulated CPU devices
    meshnet train --mesh data=4 --devices 4 --optimizer sgd --lr 0.1
    meshnet sample runs/gpt --prompt "The " --tokens 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Sequence

from meshnet import noise
from meshnet.config import (
    CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig,
    PipelineConfig, TrainConfig,
)
from meshnet.distributed import ENV_DEVICES_PER_PROCESS, multi_process_requested
from meshnet.errors import MeshnetError

# The command simulates 8 CPU devices unless told otherwise (a no-op for the
# accelerators of a GPU/TPU host); MeshConfig.devices defaults to None.
CLI_DEFAULT_DEVICES = 8


def _ints(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of integers (e.g. 512,256,128)"
    ) from None
  return values


def _optional_float(text: str) -> float | None:
  return None if text.lower() in ("none", "off", "0") else float(text)


def _auto_float(text: str) -> float | None:
  return None if text.lower() in ("auto", "none") else float(text)


def _optional_int(text: str) -> int | None:
  return None if text.lower() in ("none", "off") else int(text)


def _optional_str(text: str) -> str | None:
  return None if text.lower() in ("none", "") else text


def _count(text: str) -> float:
  """``1.5e11``, ``150G``, ``125M``, ``7B``, ``7k``: a number with an optional SI
  suffix (``B``: billion, as model sizes are written)."""
  scale = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12, "p": 1e15}
  text = text.strip()
  factor = scale.get(text[-1:].lower(), 1.0)
  try:
    value = float(text[:-1] if factor != 1.0 else text) * factor
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a number (e.g. 1.5e11, 150G, 125M, 7B)") from None
  return value


def _optional_count(text: str) -> float | None:
  return None if text.lower() in ("none", "auto") else _count(text)


# flag -> (config section, field, parser, help). The section's dataclass
# default is the flag's default.
TRAIN_FLAGS: dict[str, tuple[str, str, Callable[[str], Any], str]] = {
    "--model": ("model", "name", str, "model: mlp, or gpt (on a token data set)"),
    "--hidden": ("model", "hidden", _ints, "hidden widths, e.g. 512,256,128"),
    "--activation": ("model", "activation", str, "hidden activation"),
    "--dropout": ("model", "dropout", float, "dropout rate when training"),
    "--gpt-size": ("model", "gpt_size", str,
                   "gpt's shape: tiny, mini, small (GPT-2 small's), medium or large; "
                   "--layers/--heads/--width/--context override its values"),
    "--layers": ("model", "layers", _optional_int, "gpt blocks (default: --gpt-size's)"),
    "--heads": ("model", "heads", _optional_int,
                "gpt attention heads (default: --gpt-size's)"),
    "--width": ("model", "width", _optional_int, "gpt model width (default: --gpt-size's)"),
    "--context": ("model", "context", _optional_int,
                  "gpt's longest sequence in tokens (default: --gpt-size's)"),
    "--positions": ("model", "positions", str, "gpt positions: learned or rotary"),
    "--attention": ("model", "attention", str,
                    "gpt attention: plain (scores written out) or fused "
                    "(jax.nn.dot_product_attention: cuDNN flash attention on NVIDIA GPUs "
                    "with --precision bf16)"),
    "--dataset": ("data", "dataset", str, "xor, digits, mnist or text"),
    "--data-dir": ("data", "data_dir", _optional_str,
                   "data files: mnist's directory (default: where `meshnet data fetch "
                   "mnist` puts them); text's UTF-8 file or folder of them (default: the "
                   "embedded corpus, Python's own help topics and docstrings)"),
    "--batch-size": ("data", "batch_size", int, "global batch size"),
    "--devices": ("mesh", "devices", _optional_int,
                  "simulate N CPU devices (CPU platform only; 'none': as JAX finds)"),
    "--optimizer": ("optim", "optimizer", str, "sgd, momentum, adam or adamw"),
    "--lr": ("optim", "lr", float, "peak learning rate"),
    "--weight-decay": ("optim", "weight_decay", float,
                       "weight decay: L2 term added to the gradient for sgd, momentum and "
                       "adam (PyTorch's weight_decay); decoupled for adamw"),
    "--momentum": ("optim", "momentum", float, "momentum (optimizer momentum)"),
    "--lr-schedule": ("optim", "lr_schedule", str, "constant or warmup_cosine"),
    "--warmup-steps": ("optim", "warmup_steps", int, "warmup steps (warmup_cosine)"),
    "--clip-norm": ("optim", "clip_norm", _optional_float,
                    "clip the gradient's global norm (0/none: off)"),
    "--grad-accum": ("optim", "grad_accum", int, "gradient accumulation micro-steps"),
    "--grad-transport": ("optim", "grad_transport", str,
                         "how processes average gradients: xla (all-reduce) or shm "
                         "(CPU processes on one host: shared memory)"),
    "--schedule": ("pipeline", "schedule", str, "pipeline schedule: gpipe, 1f1b, "
                   "interleaved or zb (with --mesh stage=N)"),
    "--microbatches": ("pipeline", "microbatches", _optional_int,
                       "pipeline microbatches per data replica (default: stages)"),
    "--virtual-stages": ("pipeline", "virtual_stages", int,
                         "chunks per device (interleaved schedule)"),
    "--stage-balance": ("pipeline", "balance", str,
                        "what the cut into stages balances: params (memory per stage) or "
                        "flops (compute per stage)"),
    "--checkpoint-dir": ("checkpoint", "dir", _optional_str, "checkpoint directory"),
    "--checkpoint-every": ("checkpoint", "every", int,
                           "save every N steps (0: at the end and on SIGTERM/SIGINT)"),
    "--keep": ("checkpoint", "keep", int, "newest checkpoints to keep"),
    "--steps": ("train", "steps", _optional_int, "optimizer steps (default: from --epochs)"),
    "--epochs": ("train", "epochs", int, "epochs when --steps is not given"),
    "--seed": ("train", "seed", int, "random seed"),
    "--precision": ("train", "precision", str,
                    "fp32 or bf16: bf16 runs matmuls and activations in bfloat16 on "
                    "float32 master weights and optimizer state, loss and gradients in "
                    "float32 (with stage > 1 also between stages)"),
    "--peak-flops": ("train", "peak_flops", _optional_count,
                     "peak FLOP/s of one device for a gpt's mfu metric, e.g. 989T (default: "
                     "the device's dense bf16 peak from a table; none on CPU)"),
    "--eval-every": ("train", "eval_every", int, "evaluate every N steps (0: off)"),
    "--log-every": ("train", "log_every", int, "log every N steps"),
    "--step-timeout": ("train", "step_timeout", _auto_float,
                       "seconds a step may take before a run of several processes ends "
                       "(a stuck peer); auto: max(60, 20x the median step time after "
                       "warm-up)"),
    "--metrics-file": ("train", "metrics_file", _optional_str, "JSON-lines metrics file"),
    "--eval-batch-size": ("train", "eval_batch_size", int, "evaluation batch size"),
    "--tensorboard": ("train", "tensorboard", _optional_str,
                      "write TensorBoard event files into this directory "
                      "(view: tensorboard --logdir DIR)"),
}
# Flags whose default fits the data set (meshnet.defaults.resolve_defaults).
_FITTED = {
    "hidden": "256,128, or the data set's recipe",
    "activation": "relu, or the data set's recipe",
    "batch_size": "min(128, training examples), a multiple of what the mesh needs",
    "lr": "0.001, or the data set's recipe",
    "epochs": "20, or the data set's recipe",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except a ``None`` one (the help says what it means)."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


_SECTIONS = {"mesh": MeshConfig, "model": ModelConfig, "data": DataConfig,
             "optim": OptimConfig, "pipeline": PipelineConfig,
             "checkpoint": CheckpointConfig, "train": TrainConfig}


def _callback_error(error: BaseException) -> str | None:
  """The meshnet message inside an XLA error raised by a host callback
  (``--grad-transport shm``), or None if it is not one."""
  marker = "MeshnetError: "
  text = str(error)
  if type(error).__name__ != "JaxRuntimeError" or marker not in text:
    return None
  return text.rsplit(marker, 1)[1].strip().splitlines()[0]


def _dest(flag: str) -> str:
  return flag.lstrip("-").replace("-", "_")


def _add_train_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "train", help="train a model (defaults: MLP on digits, 8 simulated CPU devices)",
      description="Train a model data-parallel over a device mesh. Every flag is a "
      "field of meshnet.Config. Settings not given fit the data set: the batch is at "
      "most its size, the mesh narrows to what the batch can be split over, and a data "
      "set's recipe (xor) sets what it needs; each adjusted default is printed.",
      formatter_class=_HelpFormatter,
  )
  _allow_negative_ranges(parser)
  _add_train_flags(parser)
  _add_verbose(parser)


def _allow_negative_ranges(parser: argparse.ArgumentParser) -> None:
  """`--profile-steps -1:3 DIR` reaches the config's check (one line) instead
  of argparse taking -1:3 for an unknown option."""
  parser._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+:-?\d+$")


def _add_train_flags(parser: argparse.ArgumentParser | Any,
                     devices_default: int | None = CLI_DEFAULT_DEVICES,
                     skip: Sequence[str] = ()) -> None:
  """``meshnet train``'s flags (every one a field of :class:`Config`), on
  ``parser`` or an argument group of it; the flags in ``skip`` left out (a
  command that gives the name its own meaning: ``meshnet plan --layers``)."""
  parser.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                      help="mesh axis sizes over data,fsdp,stage,tensor; -1 = the rest "
                      "(default: data over every device, or as many as the batch can be "
                      "split over)")
  for flag, (section, field, parse, help_text) in TRAIN_FLAGS.items():
    if flag in skip:
      continue
    default = getattr(_SECTIONS[section](), field)
    if flag == "--devices":  # meshnet launch says how many devices each process has
      default = os.environ.get(ENV_DEVICES_PER_PROCESS)
      default = int(default) if default else devices_default
    if isinstance(default, tuple):
      default = ",".join(map(str, default))
    if default is None and field in _FITTED:
      help_text = f"{help_text} (default: {_FITTED[field]})"
    parser.add_argument(flag, type=parse, default=default, dest=_dest(flag),
                        help=help_text)
  parser.add_argument("--no-progress", action="store_true",
                      help="do not draw the progress bar (TrainConfig.progress=False)")
  parser.add_argument("--tie-embeddings", action="store_true",
                      help="gpt's head is its token table, as GPT-2's, instead of a matrix "
                      "of its own (ModelConfig.tie_embeddings)")
  parser.add_argument("--show-sharding", action="store_true",
                      help="print a table of every parameter before training: path, "
                      "shape, dtype, PartitionSpec and bytes per device "
                      "(TrainConfig.show_sharding)")
  parser.add_argument("--deterministic", action="store_true",
                      help="average gradients in a fixed order: bit-identical results on "
                      "any process layout (OptimConfig.deterministic)")
  parser.add_argument("--remat", nargs="?", const="full", default="none",
                      metavar="{none,layer,full}",
                      help="what the backward recomputes instead of keeping "
                      "(jax.checkpoint): none keeps the forward's residuals, layer keeps "
                      "each layer's input, full (--remat alone) keeps only the model's "
                      "(each stage's, with a pipeline) input; less memory, more compute "
                      "(TrainConfig.remat; default: none)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the newest complete checkpoint in "
                      "--checkpoint-dir (CheckpointConfig.resume)")
  parser.add_argument("--allow-data-change", action="store_true",
                      help="with --resume: continue even though the data differ from those "
                      "the checkpoint was saved with (refused otherwise; "
                      "CheckpointConfig.allow_data_change)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the checkpoints already in --checkpoint-dir, deleted "
                      "when this run saves its first step (CheckpointConfig.overwrite), "
                      "and a trace already in the --profile-steps DIR")
  parser.add_argument("--profile-steps", nargs=2, default=None, metavar=("A:B", "DIR"),
                      help="write a jax.profiler trace of the steps after the first A, up "
                      "to B (3:5 traces steps 4 and 5) into DIR, one per process; "
                      "summarise it with meshnet profile DIR (TrainConfig.profile_steps, "
                      "profile_dir)")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
  """``--verbose``: the command's output only, not a field of Config."""
  parser.add_argument("--verbose", action="store_true", default=noise.verbose_from_env(),
                      help="show the libraries' own output too: gloo's connection lines, "
                      "C++ and absl warnings (default: hidden; also "
                      f"{noise.ENV_VERBOSE}=1)")


def _add_data_parser(subparsers) -> None:
  from meshnet.fetch import ENV_MNIST_MIRROR, FETCHABLE, MNIST_MIRROR

  data = subparsers.add_parser(
      "data", help="download data sets (training never downloads)",
      description="Data set files. `meshnet data fetch mnist` downloads MNIST once; "
      "`meshnet train --dataset mnist` then reads it without --data-dir.")
  actions = data.add_subparsers(dest="data_command", metavar="ACTION")
  actions.required = True
  fetch = actions.add_parser(
      "fetch", help="download and verify a data set's files",
      description="Download the data set's files (MD5-verified; resumes partial files, "
      "skips verified ones) into --dir.")
  fetch.add_argument("dataset", choices=FETCHABLE)
  fetch.add_argument("--dir", default=None, metavar="DIR",
                     help="where to put the files (default: $MESHNET_DATA_DIR/mnist, else "
                     "$XDG_CACHE_HOME/meshnet/mnist or ~/.cache/meshnet/mnist: where "
                     "meshnet train --dataset mnist looks without --data-dir)")
  fetch.add_argument("--mirror", default=None, metavar="URL",
                     help=f"base URL holding the files (default: ${ENV_MNIST_MIRROR}, else "
                     f"{MNIST_MIRROR})")


def config_from_args(args: argparse.Namespace, skip: Sequence[str] = ()) -> Config:
  """The :class:`Config` that parsed ``meshnet train`` flags describe (the
  flags in ``skip`` were not train's: their fields keep their defaults)."""
  fields: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
  for flag, (section, field, parse, _) in TRAIN_FLAGS.items():
    if flag not in skip:
      fields[section][field] = getattr(args, _dest(flag))
  fields["model"]["tie_embeddings"] = args.tie_embeddings
  fields["train"]["progress"] = not args.no_progress
  fields["train"]["show_sharding"] = args.show_sharding
  fields["checkpoint"]["resume"] = args.resume
  fields["checkpoint"]["overwrite"] = args.overwrite
  fields["checkpoint"]["allow_data_change"] = args.allow_data_change
  fields["optim"]["deterministic"] = args.deterministic
  fields["train"]["remat"] = args.remat
  if args.profile_steps is not None:
    from meshnet.profiling import parse_step_range
    steps, directory = args.profile_steps
    fields["train"]["profile_steps"] = parse_step_range(steps)
    fields["train"]["profile_dir"] = directory
  devices = fields["mesh"].pop("devices")
  mesh = (MeshConfig.parse(args.mesh, devices=devices) if args.mesh is not None
          else MeshConfig(devices=devices))
  return Config(
      mesh=mesh,
      **{name: cls(**fields[name]) for name, cls in _SECTIONS.items() if name != "mesh"},
  )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="meshnet", description="Pure-JAX distributed training on a device mesh."
  )
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  subparsers.required = True
  _add_train_parser(subparsers)
  _add_data_parser(subparsers)
  launch = subparsers.add_parser(
      "launch", help="run a command in N local processes joined by jax.distributed",
      description="Start N processes on this host (like torchrun), each with the "
      "environment meshnet.initialize() reads; prefix their output with [i]; stop all "
      "when one fails (and with --max-restarts, start them again). Example: meshnet "
      "launch -n 2 --max-restarts 3 -- meshnet train --mesh data=2 --checkpoint-dir "
      "runs/ck")
  launch.add_argument("-n", "--num-processes", type=int, required=True)
  launch.add_argument("--devices-per-process", type=int, default=None,
                      help="simulated CPU devices per process (default 1; ignored on "
                      "GPUs/TPUs)")
  launch.add_argument("--cpus-per-process", type=int, default=None, metavar="K",
                      help="pin each process to K cores of its own, set OMP_NUM_THREADS "
                      "etc. to K and keep glibc's allocator from unmapping XLA's buffers "
                      "after every step (unless MALLOC_*/GLIBC_TUNABLES are set; default: "
                      "no pinning)")
  launch.add_argument("--max-restarts", type=int, default=0, metavar="N",
                      help="when a process fails, stop the others and start the group "
                      "again, up to N times; meshnet train continues from the newest "
                      "checkpoint this job saved in --checkpoint-dir (--resume added, "
                      "--overwrite dropped) (default 0: never)")
  _add_verbose(launch)
  launch.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- CMD",
                      help="the command each process runs")
  inspect = subparsers.add_parser(
      "inspect", help="list checkpoints, the parameter tree and a digest",
      description="List the checkpoints in DIR (step, time, size), the parameter tree "
      "of the newest (or --step) and, with --digest, a SHA-256 of its values; with --verify, "
      "check every step's values against the digest saved with it.")
  inspect.add_argument("dir", help="checkpoint directory")
  inspect.add_argument("--digest", action="store_true", help="print a digest of the values")
  inspect.add_argument("--step", type=int, default=None, help="which checkpoint")
  inspect.add_argument("--verify", action="store_true",
                       help="read every checkpoint (or --step) and check its values against "
                       "the digest its meta keeps; one line per step (ok, mismatch, "
                       "unreadable); exit 1 if any is bad")
  _add_sample_parser(subparsers)
  _add_plot_parser(subparsers)
  _add_bench_parser(subparsers)
  _add_profile_parser(subparsers)
  _add_plan_parser(subparsers)
  return parser


def _add_bench_parser(subparsers) -> None:
  from meshnet.commbench import COLLECTIVES, DEFAULT_SIZES, BenchConfig

  bench = subparsers.add_parser(
      "bench", help="measure meshnet's parts on this machine (collectives)",
      description="Benchmarks. `meshnet bench collectives` times every collective over a "
      "mesh axis at a few sizes, in one process or under meshnet launch.")
  kinds = bench.add_subparsers(dest="bench_command", metavar="WHAT")
  kinds.required = True
  defaults = BenchConfig()
  collectives = kinds.add_parser(
      "collectives", formatter_class=_HelpFormatter,
      help="time, algorithmic and bus bandwidth of each collective (nccl-tests style)",
      description="Time each collective at each buffer size over the --axes of the mesh: "
      "median and spread per call, algorithmic bandwidth (bytes / time) and bus bandwidth "
      "(x 2(n-1)/n for all_reduce, (n-1)/n for all_gather, reduce_scatter, all_to_all, "
      "gather, scatter, 1 for broadcast, reduce, shift). A table on stdout; JSON lines "
      "with --output or --json. Across processes: meshnet launch -n 2 -- meshnet bench "
      "collectives --mesh data=2")
  collectives.add_argument("--collectives", default="all", metavar="A,B,...",
                           help=f"which: all, or some of {','.join(COLLECTIVES)}")
  collectives.add_argument("--sizes", default=",".join("x".join(map(str, s))
                                                       for s in DEFAULT_SIZES),
                           metavar="RxC,...",
                           help="buffer shapes: each device's input of all_reduce, the "
                           "gathered output of all_gather (nccl-tests' size)")
  collectives.add_argument("--dtype", default=defaults.dtype, help="element type")
  collectives.add_argument("--axes", default=",".join(defaults.axes), metavar="AXIS,...",
                           help="mesh axes the collectives run over, as one axis")
  collectives.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                           help="mesh axis sizes over data,fsdp,stage,tensor (default: every "
                           "device on the first of --axes)")
  collectives.add_argument(
      "--devices", type=_optional_int,
      default=int(os.environ.get(ENV_DEVICES_PER_PROCESS) or CLI_DEFAULT_DEVICES),
      help="simulate N CPU devices (per process; CPU platform only; 'none': as JAX finds)")
  collectives.add_argument("--iters", type=int, default=defaults.iters,
                           help="timed runs per collective and size")
  collectives.add_argument("--warmup", type=int, default=defaults.warmup,
                           help="untimed runs before them")
  collectives.add_argument("--calls", type=_optional_int, default=None,
                           help="collectives per timed run, in one compiled loop (default: "
                           "enough for a run of about 50 ms)")
  collectives.add_argument("--output", default=None, metavar="FILE.jsonl",
                           help="also write one JSON line per collective and size here")
  collectives.add_argument("--json", action="store_true",
                           help="print the JSON lines on stdout instead of the table")
  _add_verbose(collectives)


def _add_profile_parser(subparsers) -> None:
  profile = subparsers.add_parser(
      "profile", help="summarise a trace written by meshnet train --profile-steps",
      description="Per traced step and process: the step's time, the time in compute and "
      "in each collective kind (all-reduce, all-gather, collective-permute, ...), the bytes "
      "each collective kind moved, and the collectives by named scope (gradient_exchange, "
      "pipeline_send, ...). Example: meshnet train --mesh data=2 --steps 6 --profile-steps "
      "3:5 runs/prof && meshnet profile runs/prof")
  profile.add_argument("dir", metavar="DIR",
                       help="the directory given to meshnet train --profile-steps A:B DIR")
  profile.add_argument("--json", action="store_true",
                       help="print the summary as JSON instead of tables")


# meshnet train's flags that meshnet plan gives another meaning.
_PLAN_OWN_FLAGS = ("--layers",)


def _add_plan_parser(subparsers) -> None:
  from meshnet.hardware import DEVICE_KINDS

  plan = subparsers.add_parser(
      "plan", help="predict a step's memory, traffic and time, and its scaling",
      description="Plan what `meshnet train` with the same flags would run: per device the "
      "bytes of parameters, gradients, optimizer state, activations and XLA's buffers "
      "(beside XLA's own numbers of the compiled step when the mesh fits this process's "
      "devices); per step the bytes each mesh axis sends, compute and communication time, "
      "pipeline bubble and step time; and the step time and speedup on 1, 2, 4, ... "
      "devices. Example: meshnet plan --mesh data=2,stage=2 --batch-size 1024 "
      "--microbatches 8 --schedule 1f1b",
      formatter_class=_HelpFormatter)
  _allow_negative_ranges(plan)
  what = plan.add_argument_group(
      "the run to plan (meshnet train's flags; those that do not change the step, such "
      "as --lr or --steps, are accepted and ignored)")
  _add_train_flags(what, devices_default=None, skip=_PLAN_OWN_FLAGS)
  own = plan.add_argument_group("the plan")
  own.add_argument("--layers", type=_ints, default=None, metavar="W0,W1,...",
                   help="plan an MLP of these widths (input first) instead of --model/--hidden "
                   "on the data set's sizes, e.g. 784,1024,1024,10")
  own.add_argument("--params", type=_count, default=None, metavar="N",
                   help="plan a model known only by its parameter count (e.g. 125M): memory, "
                   "gradient traffic and 6N FLOPs per example; no activations or pipeline")
  own.add_argument("--device-kind", default="auto", metavar="KIND",
                   help=f"device to plan for: {', '.join(DEVICE_KINDS)}, or auto (this "
                   "host's first JAX device); cpu times a training step of the model's "
                   "layers and an update here, the others use nominal figures")
  own.add_argument("--flops", type=_count, default=None, metavar="FLOP/S",
                   help="sustained matmul FLOP/s per device (e.g. 150G), instead of the "
                   "kind's figure")
  own.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                   help="link bus bandwidth in GB/s (1e9 bytes/s) for every collective")
  own.add_argument("--latency", type=float, default=None, metavar="us",
                   help="latency of one collective call in microseconds")
  own.add_argument("--link-file", default=None, metavar="FILE.jsonl",
                   help="fit latency and bandwidth per collective to the JSON lines of "
                   "`meshnet bench collectives` (--bandwidth/--latency still override)")
  own.add_argument("--max-devices", type=int, default=None, metavar="N",
                   help="project the step on 1, 2, 4, ... N devices (default: the mesh's "
                   "devices, at least 8)")
  own.add_argument("--json", action="store_true", help="print the plan as JSON")
  own.add_argument("--no-xla", action="store_true",
                   help="do not compile the step for XLA's memory numbers")
  _add_verbose(plan)


def _add_sample_parser(subparsers) -> None:
  sample = subparsers.add_parser(
      "sample", help="continue a prompt with a model trained on --dataset text",
      description="Load the newest (or --step) checkpoint that meshnet train --dataset text "
      "wrote in DIR, rebuild its model from the config kept with it, and print the prompt "
      "followed by N generated bytes: greedy with --temperature 0, else drawn with --seed "
      "(optionally among the --top-k most likely). The model reads a window of its training "
      "context (the prompt's last bytes when longer). Example: meshnet sample runs/gpt "
      "--prompt 'The ' --tokens 200 --temperature 0.8 --top-k 40",
      formatter_class=_HelpFormatter)
  sample.add_argument("dir", metavar="CHECKPOINT_DIR",
                      help="the --checkpoint-dir of a meshnet train --dataset text run")
  sample.add_argument("--prompt", default=None, metavar="TEXT",
                      help="the text to continue (default: a newline)")
  sample.add_argument("--tokens", type=int, default=200, metavar="N",
                      help="bytes to generate")
  sample.add_argument("--temperature", type=float, default=1.0, metavar="T",
                      help="0: greedy (the most likely byte); above 0: sample from "
                      "softmax(logits / T)")
  sample.add_argument("--top-k", type=_optional_int, default=None, metavar="K",
                      help="sample only among the K most likely bytes (default: all)")
  sample.add_argument("--seed", type=int, default=0, help="seed of the draws")
  sample.add_argument("--step", type=int, default=None,
                      help="which checkpoint (default: the newest)")
  _add_verbose(sample)


def _add_plot_parser(subparsers) -> None:
  plot = subparsers.add_parser(
      "plot", help="draw loss and accuracy curves of metrics files into a PNG",
      description="Draw the loss (train and eval) and eval accuracy curves of one or more "
      "JSON-lines files written by meshnet train --metrics-file, each run labelled, on one "
      "figure. Example: meshnet plot runs/a.jsonl runs/b.jsonl -o loss.png")
  plot.add_argument("files", nargs="+", metavar="METRICS.jsonl", help="metrics files")
  plot.add_argument("-o", "--output", default="loss.png",
                    help="the picture to write (.png; .pdf and .svg work too)")
  plot.add_argument("--labels", type=lambda text: [s.strip() for s in text.split(",")],
                    default=None, metavar="A,B,...",
                    help="one legend name per file (default: the file names)")
  plot.add_argument("--title", default=None, help="a title over the panels")


def _quiet(verbose: bool) -> None:
  """Third-party noise off the terminal unless ``verbose`` (:mod:`meshnet.noise`):
  C++ and absl logs from ERROR up; a process of several started by hand
  (not by ``meshnet launch``, which filters its children) filters its stdout,
  and its stderr for jaxlib's abort when a peer is lost (:mod:`meshnet.faults`)."""
  noise.quiet_logs(verbose)
  if verbose:  # run() reads it: the raw details of a lost peer (meshnet.faults)
    os.environ[noise.ENV_VERBOSE] = "1"
  if not multi_process_requested() or os.environ.get(noise.ENV_FILTERED):
    return
  if not verbose:
    noise.filter_stdout()
  # jaxlib's abort for a lost peer: copied to this file, replaced by one line
  fatal_log = os.path.join(tempfile.gettempdir(), f"meshnet-{os.getpid()}-fatal.log")
  with contextlib.suppress(OSError):
    os.remove(fatal_log)
  if noise.filter_stderr(fatal_log, verbose=verbose):
    from meshnet import faults
    faults.set_fatal_log(fatal_log)


def _plan(args: argparse.Namespace) -> int:
  """``meshnet plan``: the table (or JSON) of :func:`meshnet.planner.make_plan`."""
  from meshnet import planner
  if args.layers is not None and args.hidden is not None:
    raise MeshnetError("give --layers W0,W1,... (the whole MLP) or --hidden, not both")
  if args.layers is not None and args.params is not None:
    raise MeshnetError("give --layers W0,W1,... or --params N, not both")
  config = config_from_args(args, skip=_PLAN_OWN_FLAGS)
  result, notes = planner.make_plan(
      config, layers=args.layers, num_params=args.params, device_kind=args.device_kind,
      flops=args.flops, bandwidth_GBps=args.bandwidth, latency_us=args.latency,
      link_file=args.link_file, max_devices=args.max_devices, compile=not args.no_xla)
  if args.json:
    print(json.dumps({**result.to_dict(), "notes": notes + list(result.notes)}, indent=2))
  else:
    for note in notes:
      print(note)
    print(planner.format_plan(result))
  return 0


class _Terminated(KeyboardInterrupt):
  """SIGTERM outside the training loop (which saves a checkpoint instead)."""


def _raise_terminated(signum, frame) -> None:
  del signum, frame
  raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``meshnet`` command; returns the exit status."""
  args = build_parser().parse_args(argv)
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
  try:
    if args.command == "train":
      from meshnet.train import run
      _quiet(args.verbose)
      run(config_from_args(args))  # applies --devices before JAX starts
    elif args.command == "data":
      from meshnet.fetch import fetch_command
      return fetch_command(args.dataset, args.dir, mirror=args.mirror)
    elif args.command == "launch":
      from meshnet.launch import launch
      command = args.command_args
      command = command[1:] if command and command[0] == "--" else command
      return launch(args.num_processes, command, devices_per_process=args.devices_per_process,
                    cpus_per_process=args.cpus_per_process,
                    max_restarts=args.max_restarts, verbose=args.verbose)
    elif args.command == "inspect":
      from meshnet.checkpoint import describe, verify
      if args.verify:
        report, good = verify(args.dir, step=args.step)
        print(report)
        return 0 if good else 1
      print(describe(args.dir, with_digest=args.digest, step=args.step))
    elif args.command == "plan":
      _quiet(args.verbose)
      return _plan(args)
    elif args.command == "sample":
      from meshnet.sample import sample_checkpoint
      _quiet(args.verbose)
      prompt = "\n" if args.prompt is None else args.prompt
      result = sample_checkpoint(args.dir, prompt, args.tokens,
                                 temperature=args.temperature, top_k=args.top_k,
                                 seed=args.seed, step=args.step)
      print(result.text)
    elif args.command == "bench":
      from meshnet import commbench
      _quiet(args.verbose)
      config = commbench.BenchConfig.parse(
          collectives=args.collectives, sizes=args.sizes, axes=args.axes,
          dtype=args.dtype, iters=args.iters, warmup=args.warmup, calls=args.calls)
      mesh = (MeshConfig.parse(args.mesh, devices=args.devices) if args.mesh is not None
              else MeshConfig(devices=args.devices))
      commbench.report(config, commbench.make_bench_mesh(config, mesh), output=args.output,
                       as_json=args.json)
    elif args.command == "profile":
      from meshnet.profile_report import format_profile, profile_summary
      summary = profile_summary(args.dir)
      print(json.dumps(summary.to_dict(), indent=1) if args.json else format_profile(summary))
    elif args.command == "plot":
      from meshnet.plot import plot_metrics
      plot_metrics(args.files, args.output, labels=args.labels, title=args.title)
      print(f"wrote {args.output}")
    return 0
  except MeshnetError as e:
    print(f"meshnet: error: {e}", file=sys.stderr)
    return 1 if isinstance(e, FloatingPointError) else 2
  except BrokenPipeError:  # `meshnet inspect DIR | head` (or profile): the reader left
    sys.stderr.close()
    return 0
  except Exception as e:  # noqa: BLE001  (XLA wraps errors raised in host callbacks)
    message = _callback_error(e)
    if message is None:
      raise
    print(f"meshnet: error: {message}", file=sys.stderr)
    return 2
  except _Terminated:
    # Everything that must finish (a save in flight) did as the exception
    # unwound; exit at once: XLA's threads can crash an ordinary interpreter
    # shutdown that a signal cut short (exit 139 instead of 143).
    print("meshnet: terminated (SIGTERM)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signal.SIGTERM)
  except KeyboardInterrupt:
    print("meshnet: interrupted", file=sys.stderr)
    jax = sys.modules.get("jax")
    if args.command == "train" and jax is not None and jax.process_count() > 1:
      # A step still in flight may be inside a host call (--grad-transport
      # shm waits there for its peers), and a Python thread that wakes
      # during the interpreter's shutdown aborts the process (exit 134,
      # "terminate called without an active exception"): leave the peers
      # as an ordinary exit does, then skip the interpreter's shutdown.
      # One process (a notebook calling main) returns as before.
      jax.distributed.shutdown()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(130)
    return 130
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
  sys.exit(main())
