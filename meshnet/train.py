"""The training run: ``run(config)`` builds the mesh, data, model, optimizer
and step from a :class:`~meshnet.config.Config`, trains, evaluates and logs.

``meshnet train`` is this function behind a flag parser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from meshnet import flops, models, runcost
from meshnet.checkpoint import Checkpointer, from_logical, saved_config, to_logical
from meshnet.config import CheckpointConfig, Config, DataConfig
from meshnet.data import (
    TEXT_CONTEXT, BatchSampler, Dataset, TextDataset, check_dataset, describe_text,
    fingerprint, global_batch, load_dataset,
)
from meshnet.defaults import resolve_defaults
from meshnet.distributed import initialize
from meshnet.errors import MeshnetError, NonFiniteLossError, NonFiniteStateError
from meshnet.faults import PeerGuard, StepWatchdog, catch_abort
from meshnet.mesh import (
    DATA, FSDP, STAGE, axis_size, describe_mesh, make_mesh, select_devices,
    set_cpu_device_count,
)
from meshnet.metrics import Bar, MetricsWriter, Progress, check_metrics_file, is_main_process
from meshnet.model import Model, Params
from meshnet.models.gpt import check_token_data
from meshnet.noise import verbose_from_env
from meshnet.optim import make_optimizer, make_schedule
from meshnet.pipeline import make_pipeline
from meshnet.pipeline.timeline import text as timeline_text
from meshnet.profiling import StepProfiler
from meshnet.sharding import batch_sharding
from meshnet.step import (
    TrainState, check_batch_size, init_train_state,
    make_eval_step, make_train_step,
)
from meshnet.tensorboard import TensorBoardWriter, check_logdir


class RunResult(NamedTuple):
  """What :func:`run` returns.

  Attributes:
    state: the final :class:`~meshnet.step.TrainState`.
    eval: the last evaluation (``eval_loss``, ``eval_accuracy`` if the task
      has one), or ``{}`` when evaluation is off.
    history: every logged record, as written to the metrics file.
    params: the final parameters (``state.params``: the model's own tree,
      pipelined or not, laid out as the state keeps them).
    interrupted: SIGTERM/SIGINT stopped the run (after saving a checkpoint).
    cost: the run record, the metrics file's first record: what the run
      costs per device (:func:`meshnet.runcost.run_record`).
  """

  state: TrainState
  eval: dict[str, float]
  history: list[dict[str, Any]]
  params: Any = None
  interrupted: bool = False
  cost: dict[str, Any] | None = None


def evaluate(
    eval_step: Callable, params: Params, x: np.ndarray, y: np.ndarray,
    mesh: jax.sharding.Mesh, batch_size: int, *, progress: bool = False,
    bytes_per_token: float | None = None,
) -> dict[str, float]:
  """Mean loss (and accuracy) of ``params`` on ``(x, y)``, over the mesh.

  The examples are cut into batches of ``batch_size`` rounded up to a
  multiple of ``data`` x ``fsdp``; the last batch is padded and the padding
  masked out, so every example counts exactly once. With ``progress``, an
  evaluation of several batches draws a bar on process 0 (erased when done).
  For sequences the loss is per token (:mod:`meshnet.losses`).

  Args:
    bytes_per_token: for a language model, the bytes of text one token
      stands for (1 for byte-level text): the result then also has
      ``eval_bits_per_byte`` = ``eval_loss / (ln 2 * bytes_per_token)``.

  Returns:
    ``{"eval_loss": ..., "eval_accuracy": ...}`` (accuracy only when the
    objective defines correctness), plus ``eval_bits_per_byte`` with
    ``bytes_per_token``.
  """
  data = axis_size(mesh, DATA) * axis_size(mesh, FSDP)  # the devices the batch is split over
  batch_size = -(-min(batch_size, len(x)) // data) * data
  sharding = batch_sharding(mesh)
  totals: dict[str, float] = {}
  batches = -(-len(x) // batch_size)
  bar = Bar(batches, label="eval", enabled=progress and batches > 1 and is_main_process())
  for start in range(0, len(x), batch_size):
    stop = min(start + batch_size, len(x))
    indices = np.arange(start, start + batch_size) % len(x)
    mask = (np.arange(start, start + batch_size) < stop).astype(np.float32)
    xb, yb = global_batch((x, y), indices, sharding)
    (mb,) = global_batch((mask,), np.arange(batch_size), sharding)
    for name, value in jax.device_get(eval_step(params, (xb, yb), mb)).items():
      totals[name] = totals.get(name, 0.0) + float(value)
    bar.advance()
  bar.close(clear=True)
  result = {"eval_loss": totals["loss_sum"] / totals["count"]}
  if bytes_per_token is not None:
    result["eval_bits_per_byte"] = result["eval_loss"] / (math.log(2) * bytes_per_token)
  if "correct" in totals:
    result["eval_accuracy"] = totals["correct"] / totals["count"]
  return result


def max_steps_in_flight(mesh: jax.sharding.Mesh) -> int:
  """How many train steps the host may dispatch before waiting for the oldest.

  On accelerators, and on CPU with one device per process, two: the host
  queues the next step while one runs. On CPU with several local devices one: XLA:CPU runs each device's program on a shared thread pool and
  its in-process collectives block their thread at a rendezvous; with many
  steps of an 8-device program queued on 2 cores, threads parked in step
  k+1's all-reduce starved step k's devices until XLA aborted the process
  (rendezvous termination timeout, seen here with 40 queued steps of the
  784-512-256-128-10 MLP; 100 steps with at most 1 or 2 in flight ran clean).
  """
  platform = mesh.devices.flat[0].platform
  return 1 if platform == "cpu" and len(mesh.local_devices) > 1 else 2


def _check_model_and_data(model: Model, dataset: Dataset, *, evaluates: bool) -> None:
  """Refuses, before anything compiles, a data set or model that cannot train.

  The data set must hold together (:func:`~meshnet.data.check_dataset`:
  shapes of both splits, labels in ``[0, num_outputs)``), and the model must
  map one example batch ``[1, ...]`` of it to what the loss compares with the
  targets: ``[1, num_outputs]`` logits for ``cross_entropy`` (``[1, T,
  num_outputs]`` for ``[N, T]`` sequence labels), ``[1, O]`` like the targets
  for ``mse``. Only shapes are computed (``jax.eval_shape``).

  Raises:
    MeshnetError: naming the data set and both shapes.
  """
  check_dataset(dataset, evaluates=evaluates)
  x_1xF = dataset.x_train[:1]
  try:
    out = jax.eval_shape(lambda key, x: model.apply(model.init(key), x),
                         jax.random.key(0), x_1xF)
  except MeshnetError:
    raise
  except (TypeError, ValueError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise MeshnetError(
        f"the model cannot take a batch of shape {x_1xF.shape} from dataset "
        f"{dataset.name}: {reason}"
    ) from None
  targets = {"cross_entropy": (1, *dataset.y_train.shape[1:], dataset.num_outputs),
             "mse": (1, *dataset.y_train.shape[1:])}
  expected = targets.get(dataset.loss) if isinstance(dataset.loss, str) else None
  shape = tuple(getattr(out, "shape", ()))
  if expected is not None and shape != expected and isinstance(dataset, TextDataset):
    raise MeshnetError(
        f"the model maps tokens {x_1xF.shape} to {shape} but dataset {dataset.name} needs "
        f"next-byte logits {expected}: a sequence model from [B, T] int32 to [B, T, "
        f"{dataset.num_outputs}], such as --model gpt")
  if expected is not None and shape != expected:
    outputs = "x".join(map(str, expected[1:]))
    raise MeshnetError(
        f"the model maps a batch of shape {x_1xF.shape} to {shape} but dataset "
        f"{dataset.name} ({dataset.loss}) needs {expected}; build the model with "
        f"{outputs} outputs per example"
    )


def _build_model(config: Config, dataset: Dataset) -> Model:
  """``config.model``'s built-in model for ``dataset`` (a gpt: checking that
  the data are tokens, with its blocks checkpointed when ``train.remat`` is
  not ``none``)."""
  if config.model.name == "gpt":
    check_token_data(dataset.name, dataset.x_train)
  return build_model(config, dataset.input_size, dataset.num_outputs)


def build_model(config: Config, input_size: int, num_outputs: int) -> Model:
  """The built-in model ``config.model`` describes (resolved: no ``None``
  field the model needs), for ``input_size`` inputs (a text data set's:
  its context) and ``num_outputs`` outputs (a gpt's vocabulary). ``meshnet
  sample`` rebuilds a checkpoint's model with it."""
  mc = config.model
  gpt_cfg = mc.gpt_config(remat=config.train.remat != "none") if mc.name == "gpt" else None
  return models.build(mc.name, input_size, num_outputs, hidden=mc.hidden,
                      activation=mc.activation, dropout=mc.dropout, gpt_cfg=gpt_cfg)


def _gpt_throughput(config: Config, dataset: Dataset,
                    mesh: jax.sharding.Mesh) -> flops.Throughput:
  """Tokens per example, model FLOPs per token and the peak of ``mesh``'s
  devices (``train.peak_flops`` or :func:`meshnet.flops.peak_flops`) of a
  built-in gpt on ``dataset``."""
  seq_len = int(dataset.x_train.shape[1])
  cfg = config.model.gpt_config(vocab=dataset.num_outputs)
  peak = config.train.peak_flops or flops.peak_flops()
  return flops.Throughput(seq_len, flops.gpt_flops_per_token(cfg, seq_len),
                          peak * mesh.devices.size if peak else None)


def _resolve(config: Config, dataset: Dataset, *, builds_model: bool
             ) -> tuple[Config, list[str], jax.sharding.Mesh]:
  """The config with its unset fields filled (from the checkpoint being
  resumed, the data set's recipe or the defaults: :func:`resolve_defaults`),
  one note per adjusted default, and the mesh it describes (on the first
  devices, when the default mesh was narrowed to fit the batch)."""
  devices = select_devices(config.mesh.devices)
  cc = config.checkpoint
  config, notes = resolve_defaults(
      config, dataset, len(devices), processes=jax.process_count(),
      saved=saved_config(cc.dir) if cc.resume and cc.dir else None,
      builds_model=builds_model)
  axes = config.mesh.axes()
  return config, notes, make_mesh(devices=devices[:math.prod(axes.values())], **axes)


def text_context(config: Config) -> int:
  """Tokens per example of ``--dataset text``: the model's context. For
  ``--model gpt`` that is ``--context``, else its ``--gpt-size``'s; for other
  models ``model.context`` when set, else :data:`~meshnet.data.TEXT_CONTEXT`
  (a custom model passed to :func:`run` takes the data's windows as they
  come: pass ``dataset=meshnet.data.text(context=T)`` for another length)."""
  mc = config.model
  if mc.name == "gpt":
    return mc.gpt_config().context
  return TEXT_CONTEXT if mc.context is None else mc.context


def _format_eval(step: int, result: dict[str, float]) -> str:
  text = f"eval @ step {step}: loss {result['eval_loss']:.4f}"
  if "eval_bits_per_byte" in result:
    text += f", {result['eval_bits_per_byte']:.4f} bits/byte"
  if "eval_accuracy" in result:
    text += f", accuracy {100 * result['eval_accuracy']:.2f}%"
  return text


def run(
    config: Config = Config(), *, model: Model | None = None,
    dataset: Dataset | None = None, log: Callable[[str], None] | None = None,
) -> RunResult:
  """Trains as ``config`` says; returns the final state and metrics.

  Fields of ``config`` left ``None`` (not given) are filled for the data set
  and the devices first (:func:`~meshnet.defaults.resolve_defaults`), as
  ``meshnet train`` does; each adjusted default is logged as one line.

  Args:
    config: the run's configuration.
    model: a model to use instead of ``config.model`` (any
      :class:`~meshnet.Model`, e.g. a user's own pair of functions); it must
      map ``dataset``'s inputs to its outputs.
    dataset: data to use instead of ``config.data.dataset``.
    log: where to print one-off lines (default: the progress bar's stream,
      process 0 only).

  Raises:
    MeshnetError: bad configuration (with the value and the fix).
    NonFiniteLossError: the loss became NaN or infinite (names the step).
    NonFiniteStateError: an update made the parameters or optimizer state
      NaN or infinite (names the step); nothing from that step is saved.
  """
  check_metrics_file(config.train.metrics_file)
  check_logdir(config.train.tensorboard)
  if config.mesh.devices is not None:
    try:  # before initialize(): the count of CPU devices this process brings
      set_cpu_device_count(config.mesh.devices)
    except MeshnetError:
      pass  # JAX already started; select_devices says what can be used
  initialize()  # joins the other processes when launched as several; else no-op
  gpt_on_text = (dataset is None and model is None and config.model.name == "gpt"
                 and config.data.dataset == DataConfig().dataset)
  if gpt_on_text:  # a gpt reads byte tokens: the embedded text, not the default digits
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, dataset="text"))
  if dataset is None:
    dataset = load_dataset(config.data.dataset, config.data.data_dir,
                           context=text_context(config))
  config, notes, mesh = _resolve(config, dataset, builds_model=model is None)
  if gpt_on_text:
    notes.insert(0, f"dataset text (--model gpt reads byte tokens; default "
                 f"{DataConfig().dataset})")
  tc, oc = config.train, config.optim
  builds_gpt = model is None and config.model.name == "gpt"
  if model is None:
    model = _build_model(config, dataset)
  _check_model_and_data(model, dataset, evaluates=tc.eval_every > 0)
  batch_size = config.data.batch_size
  sampler = BatchSampler(len(dataset.x_train), batch_size, seed=tc.seed)
  pipeline = None
  grad_accum = oc.grad_accum
  if axis_size(mesh, STAGE) > 1:
    if builds_gpt and config.model.tie_embeddings:
      raise MeshnetError(
          f"--tie-embeddings with stage={axis_size(mesh, STAGE)}: a tied gpt head reads the "
          "first stage's token table, so it cannot be pipelined; drop --tie-embeddings or "
          "use a mesh without stage")
    pc = config.pipeline
    microbatches = (pc.microbatches or axis_size(mesh, STAGE)) * oc.grad_accum
    pipeline = make_pipeline(model, mesh, dataset.x_train.shape[1:], schedule=pc.schedule,
                             microbatches=microbatches, virtual_stages=pc.virtual_stages,
                             remat=tc.remat, precision=tc.precision,
                             input_dtype=dataset.x_train.dtype, balance=pc.balance)
    grad_accum = 1  # folded into the microbatches: the same mean gradient
    check_batch_size(batch_size, mesh, microbatches, what="microbatches")
  else:
    check_batch_size(batch_size, mesh, grad_accum)
  total = tc.steps if tc.steps is not None else tc.epochs * sampler.steps_per_epoch
  optimizer = make_optimizer(oc, total)
  schedule = make_schedule(oc, total)

  progress = Progress(total, enabled=tc.progress)
  say = log or progress.message
  cc = config.checkpoint
  profiler = StepProfiler(tc.profile_steps, tc.profile_dir, log=say, mesh=mesh,
                          replace=cc.overwrite or cc.resume)  # a restart traces again
  profiler.check(total)
  for note in notes:  # the defaults adjusted to the data set and the devices
    say(note)
  say(describe_mesh(mesh).splitlines()[0])
  say(f"{dataset.name}: {len(dataset.x_train)} train / {len(dataset.x_test)} test "
      f"examples; global batch {batch_size} ({sampler.steps_per_epoch} steps/epoch); "
      f"{total} steps")
  if isinstance(dataset, TextDataset):
    say(describe_text(dataset))

  if pipeline is not None:
    b = pipeline.bounds
    v = pipeline.schedule.virtual_stages
    stages = (f"{pipeline.num_virtual_stages} stages" if v == 1 else
              f"{pipeline.num_virtual_stages} virtual stages ({axis_size(mesh, STAGE)} "
              f"devices x {v})")
    say(f"pipeline: {stages} cut by {pc.balance}, layers per stage "
        f"{[b[k + 1] - b[k] for k in range(len(b) - 1)]}, parameters per stage "
        f"{list(pipeline.stage_param_counts)} (each stage's vectors hold the longest: "
        f"{pipeline.stage_padding:.2f}x the mean)")
    say(timeline_text(pipeline.schedule))
    rounds = pipeline.rounds
    kept = {"none": "vjp residuals kept", "layer": "layer inputs, layers recomputed",
            "full": "stage inputs, forward recomputed"}[tc.remat]
    say(f"executor: {rounds.num_rounds} lockstep rounds, bubble {rounds.bubble:.1%}: at most "
        f"{rounds.speedup:.2f}x one device ({kept})")
  state = init_train_state(model, optimizer, mesh, jax.random.key(tc.seed))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  say(f"model: {n_params:,} parameters; optimizer {oc.optimizer}, lr {oc.lr}; precision "
      f"{tc.precision}, remat {tc.remat}")
  throughput = _gpt_throughput(config, dataset, mesh) if builds_gpt else None
  if throughput is not None:
    say(throughput.describe())
  # A built gpt checkpoints its own blocks (inside its scan) for any remat;
  # "full" also keeps only its input.
  step_remat = ("none" if pipeline is not None or (builds_gpt and tc.remat == "layer")
                else tc.remat)
  if tc.show_sharding:
    say(runcost.format_param_table(state.params))
  train_step = make_train_step(model, optimizer, mesh, loss=dataset.loss,
                               grad_accum=grad_accum, pipeline=pipeline,
                               deterministic=oc.deterministic,
                               grad_transport=oc.grad_transport,
                               precision="fp32" if pipeline is not None else tc.precision,
                               remat=step_remat)
  eval_step = (make_eval_step(model, mesh, loss=dataset.loss, precision=tc.precision)
               if tc.eval_every else None)
  bytes_per_token = 1.0 if isinstance(dataset, TextDataset) else None  # byte-level tokens
  sharding = batch_sharding(mesh)

  # What each checkpoint keeps of the data, and a resume compares (0.1 s for MNIST).
  data_fingerprint = fingerprint(dataset) if cc.dir else None

  def save(step: int, force: bool = False) -> None:
    # The loop prefetches the next batch before saving: the position to save
    # is that of the batch after `step`'s, which is `step` (one batch a step).
    sampler_state = {**sampler.state(), "position": step}
    meta = {"sampler": sampler_state, "mesh": dict(mesh.shape),
            "config": config.to_dict(), "data": data_fingerprint}
    checkpointer.save(step, to_logical(state), meta, force=force)

  def next_batch():
    return global_batch((dataset.x_train, dataset.y_train), next(sampler), sharding)

  history: list[dict[str, Any]] = []
  last_eval: dict[str, float] = {}
  interrupted = False
  # A lost peer ends the process with one line (meshnet.faults); entered
  # again inside the checkpointer's scope, so that it acts before the
  # checkpointer's exit would wait on the dead peer.
  guard = PeerGuard(cc.dir, verbose=verbose_from_env())
  with contextlib.ExitStack() as cleanup:  # on every exit: finish the save in flight
    cleanup.enter_context(guard)
    cleanup.enter_context(catch_abort(guard))  # jaxlib's abort for a lost peer, likewise
    checkpointer = _open_checkpointer(cc, say, progress=tc.progress)  # None without a directory
    cleanup.enter_context(checkpointer or contextlib.nullcontext())
    guard.checkpointer = checkpointer
    cleanup.enter_context(guard)
    state, first_step = _resume(checkpointer, config, state, sampler, total, say,
                                data=data_fingerprint)
    profiler.starts_at(first_step)
    writer = cleanup.enter_context(MetricsWriter(
        tc.metrics_file, resumed_from=first_step - 1 if first_step > 1 else None))
    board = cleanup.enter_context(TensorBoardWriter(  # afresh: an earlier run's curves go
        tc.tensorboard, resumed_from=first_step - 1 if first_step > 1 else None,
        replace=first_step == 1))
    board.describe_run(mesh=mesh, config=config, pipeline=pipeline, step=first_step - 1)
    stop = cleanup.enter_context(_StopSignals(enabled=checkpointer is not None))
    cleanup.enter_context(profiler)  # an early exit keeps what was traced
    started = time.perf_counter()
    batch = next_batch() if first_step <= total else None
    compiled = None
    if batch is not None:
      compiled = train_step = train_step.lower(state, batch).compile()
      profiler.program = train_step  # its HLO names the ops of the trace
      say(f"compiled the train step in {time.perf_counter() - started:.1f}s")
    cost = _describe_cost(mesh, state, compiled, writer, board, say, step=first_step - 1)

    # A stuck peer: the step never finishes (several processes only).
    watchdog = (cleanup.enter_context(StepWatchdog(guard, tc.step_timeout))
                if jax.process_count() > 1 else None)
    pending: list[tuple[jax.Array, jax.Array]] = []  # (loss, state_finite) per step
    in_flight: list[jax.Array] = []
    max_in_flight = max_steps_in_flight(mesh)
    window_start = time.perf_counter()
    for step in range(first_step, total + 1):
      guard.step = step
      profiler.before_step(step, state)
      state, metrics = train_step(state, batch)
      profiler.after_step(step, (state, metrics))
      pending.append((metrics["loss"], metrics["state_finite"]))
      in_flight.append(metrics["loss"])
      stopping = stop.requested()
      save_now = checkpointer is not None and (
          step == total or stopping or (cc.every and step % cc.every == 0))
      if step < total and not stopping:
        batch = next_batch()  # overlaps with the step running asynchronously
      if len(in_flight) >= max_in_flight:
        jax.block_until_ready(in_flight.pop(0))
        if watchdog is not None:
          watchdog.beat()
      if step % tc.log_every == 0 or step == total or save_now:
        # Checked before any save: a NaN state is never written.
        window_losses = _check_finite(jax.device_get(pending), step, progress)
        elapsed = time.perf_counter() - window_start
        record = {
            "step": step, "epoch": (step - 1) // sampler.steps_per_epoch,
            "loss": float(window_losses[-1]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(schedule(step - 1)),
            "samples_per_sec": batch_size * len(pending) / elapsed,
        }
        if throughput is not None:  # a gpt: tokens_per_sec, and mfu with a known peak
          record.update(throughput.metrics(record["samples_per_sec"]))
        writer.write(record)
        board.write(record)
        history.append(record)
        progress.update(step, loss=record["loss"],
                        samples_per_sec=record["samples_per_sec"],
                        seconds_per_step=elapsed / len(pending))
        pending = []
        window_start = time.perf_counter()
      if save_now:
        save(step, force=stopping)
      if stopping:
        checkpointer.wait()
        progress.close()
        say(f"stopped by {stop.signal_name} after step {step}; saved checkpoint "
            f"{step} in {cc.dir} (continue with --resume)")
        interrupted = True
        break
      if eval_step is not None and (step % tc.eval_every == 0 or step == total):
        with watchdog.paused() if watchdog is not None else contextlib.nullcontext():
          last_eval = evaluate(eval_step, state.params, dataset.x_test,
                               dataset.y_test, mesh, tc.eval_batch_size,
                               progress=tc.progress, bytes_per_token=bytes_per_token)
        record = {"step": step, **last_eval}
        writer.write(record)
        board.write(record)
        history.append(record)
        say(_format_eval(step, last_eval))
        window_start = time.perf_counter()  # evaluation time is not training time
  progress.close()
  if is_main_process() and tc.metrics_file:
    say(f"metrics written to {tc.metrics_file}")
  if is_main_process() and tc.tensorboard:
    say(f"TensorBoard events written to {tc.tensorboard} (view: tensorboard --logdir "
        f"{shlex.quote(tc.tensorboard)})")
  return RunResult(state, last_eval, history, state.params, interrupted, cost)


def _describe_cost(mesh: jax.sharding.Mesh, state: TrainState, compiled: Any | None,
                   writer: MetricsWriter, board: TensorBoardWriter,
                   say: Callable[[str], None], *, step: int) -> dict[str, Any]:
  """Measures what the run costs per device (before the first step donates
  ``state``; ``compiled``: the compiled train step, ``None`` when there is
  nothing to train), writes it as the metrics file's run record and
  TensorBoard's ``run/cost`` text (at ``step``), prints it, and returns it."""
  cost = runcost.run_record(mesh, state, compiled)
  writer.write(cost)
  line = runcost.format_run_record(cost)
  board.text("run/cost", line + "\n" + json.dumps(
      {k: v for k, v in cost.items() if k != "kind"}, indent=1), step)
  say(line)
  return cost


def _check_finite(window: list[tuple[Any, Any]], step: int, progress: Progress) -> np.ndarray:
  """The window's losses, after checking that every loss and every updated
  state in it is finite.

  Args:
    window: ``(loss, state_finite)`` of the steps ending at ``step``.

  Raises:
    NonFiniteLossError: a loss is NaN or infinite (the first one named).
    NonFiniteStateError: an update made the state non-finite first.
  """
  losses = np.asarray([loss for loss, _ in window], np.float64)
  finite = np.asarray([ok for _, ok in window], bool)
  first_step = step - len(window) + 1
  bad_loss = np.flatnonzero(~np.isfinite(losses))
  bad_state = np.flatnonzero(~finite)
  hint = "lower --lr or set --clip-norm"
  if bad_loss.size or bad_state.size:
    progress.close()
  # Step s's loss is computed from the state step s - 1 left.
  if bad_state.size and (not bad_loss.size or bad_state[0] < bad_loss[0]):
    raise NonFiniteStateError(first_step + int(bad_state[0]), hint)
  if bad_loss.size:
    raise NonFiniteLossError(first_step + int(bad_loss[0]), float(losses[bad_loss[0]]), hint)
  return losses


def _open_checkpointer(cc: CheckpointConfig, say: Callable[[str], None], *,
                       progress: bool = True) -> Checkpointer | None:
  """The run's checkpointer (locked; a used directory refused unless resuming
  or overwriting), or ``None`` without a directory."""
  if not cc.dir:
    return None
  return Checkpointer(cc.dir, keep=cc.keep, log=say, resume=cc.resume,
                      overwrite=cc.overwrite, progress=progress)


def _resume(checkpointer: Checkpointer | None, config: Config, state: TrainState,
            sampler: BatchSampler, total: int, say: Callable[[str], None], *,
            data: dict[str, Any] | None = None) -> tuple[TrainState, int]:
  """The state to start from and the first step to run: the newest checkpoint
  that restores when resuming (moving ``sampler`` to its position), else
  ``state`` and step 1. ``data`` is the run's data fingerprint.

  Raises:
    MeshnetError: the checkpoint was saved by another model or run, or on
      other data (unless ``checkpoint.allow_data_change``).
  """
  if checkpointer is None or not config.checkpoint.resume:
    return state, 1
  restored = checkpointer.restore_latest(
      to_logical(state), config=config.to_dict(), data=data,
      allow_data_change=config.checkpoint.allow_data_change)
  if restored is None:
    say(f"no checkpoint in {config.checkpoint.dir}; starting from step 0")
    return state, 1
  sampler.position = int(restored.meta["sampler"]["position"])
  say(f"resumed from step {restored.step} of {config.checkpoint.dir}")
  if restored.step >= total:
    say(f"checkpoint step {restored.step} is at or past this run's last step {total}: "
        "nothing to train (raise --steps to continue)")
  return from_logical(restored.tree, state), restored.step + 1


class _StopSignals:
  """While active, SIGTERM and SIGINT ask the loop to stop after the current
  step (and save) instead of killing it. With several processes, a stop is
  agreed on at JAX's preemption sync point, so all save the same step."""

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __enter__(self) -> "_StopSignals":
    if self.enabled and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def requested(self) -> bool:
    if not self.enabled:
      return False
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      local = self.signal_name is not None
      agreed = bool(multihost_utils.process_allgather(np.int32(local)).max())
      if agreed and self.signal_name is None:
        self.signal_name = "a peer's signal"
      return agreed
    return self.signal_name is not None

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
