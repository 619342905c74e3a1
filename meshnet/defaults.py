"""Defaults that fit the data: the settings a run was not given.

A :class:`~meshnet.config.Config` field left at ``None`` was not given.
:func:`resolve_defaults` fills each one, in this order of preference:

1. when resuming, the checkpoint's value of a field that must match it
   (hidden widths, activation, batch size: ``meshnet.checkpoint.STATE_FIELDS``),
   so a resumed run is the run that was saved;
2. the data set's recipe (:data:`RECIPES`: XOR needs a small tanh net, a
   large learning rate and many epochs of its 4 examples);
3. the generic default (:data:`DEFAULTS`).

The global batch is the default 128, or the training set when smaller,
rounded down to a multiple of what the mesh splits it into: ``data`` times
the micro-steps of each replica (``grad_accum``, times the pipeline
microbatches with ``stage`` > 1). A mesh that was not given is data
parallelism over every device, narrowed to fewer devices when the batch
cannot be split over all of them (XOR's 4 examples use 4 of 8 devices); a
mesh that was given is used as it is (a batch it cannot split is an error).

Every default that differs from the generic one is reported as one line,
e.g. ``batch size 4 (the data set has 4 examples; default 128)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

from meshnet.config import Config, MeshConfig
from meshnet.errors import MeshnetError
from meshnet.mesh import AXES, DATA, FSDP, STAGE, resolve_axis_sizes

# The value of each field that may be left unset, when no recipe sets it.
DEFAULTS: dict[str, Any] = {
    "model.hidden": (256, 128),
    "model.activation": "relu",
    "optim.lr": 1e-3,
    "train.epochs": 20,
    "data.batch_size": 128,
}

# Per data set: the settings it needs to train well when they are not given.
# XOR: 200 full-batch Adam steps of a 2-8-1 tanh net reach 4/4 for every
# seed tried (1000 seeds; the largest error of any output is below 0.05).
RECIPES: dict[str, dict[str, Any]] = {
    "xor": {"model.hidden": (8,), "model.activation": "tanh", "optim.lr": 0.05,
            "train.epochs": 200},
    # Text (byte windows of the embedded corpus: about 17,500 of 64 bytes):
    # two epochs take the tiny gpt well below the corpus's unigram entropy in
    # a few minutes on 2 CPU cores.
    "text": {"train.epochs": 2},
}

# Fields that must equal the checkpoint's when resuming; a resumed run that
# does not give them takes the checkpoint's (meshnet.checkpoint.STATE_FIELDS).
_INHERITED = ("model.hidden", "model.activation", "data.batch_size")

_LABELS = {"model.hidden": "hidden", "model.activation": "activation", "optim.lr": "lr",
           "train.epochs": "epochs", "data.batch_size": "batch size"}


class Resolved(NamedTuple):
  """What :func:`resolve_defaults` returns (unpacks as ``config, notes``).

  Attributes:
    config: the config with every field set: no ``None`` among the fields
      :data:`DEFAULTS` lists, and mesh axes as concrete sizes.
    notes: one line for each default that was adjusted (differs from
      :data:`DEFAULTS`, or a mesh narrower than every device).
  """

  config: Config
  notes: list[str]


def _show(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return str(value)


def _get(config: Config, field: str) -> Any:
  section, name = field.split(".")
  return getattr(getattr(config, section), name)


def _inheritable(saved: Mapping[str, Any] | None, config: Config) -> dict[str, Any]:
  """The checkpoint's values of :data:`_INHERITED`, when the checkpoint was
  saved by the same model on the same data set (else none: resuming will
  report the mismatch)."""
  if not isinstance(saved, Mapping):
    return {}
  sections = {name: saved.get(name) for name in ("model", "data")}
  if not all(isinstance(s, Mapping) for s in sections.values()):
    return {}
  if (sections["data"].get("dataset") != config.data.dataset
      or sections["model"].get("name") != config.model.name):
    return {}
  values = {}
  for field in _INHERITED:
    section, name = field.split(".")
    value = sections[section].get(name)
    if isinstance(value, list):
      value = tuple(value)
    if value is not None:
      values[field] = value
  return values


def _micro_steps(config: Config, axes: dict[str, int]) -> tuple[int, str]:
  """Parts each data replica's batch is cut into, and their description."""
  accum = config.optim.grad_accum
  if axes[STAGE] > 1:
    microbatches = config.pipeline.microbatches or axes[STAGE]
    parts, what = microbatches * accum, f"microbatches={microbatches * accum}"
  else:
    parts, what = accum, f"grad_accum={accum}"
  return parts, what


def _fit_default_mesh(batch: int | None, n_train: int, n_devices: int, parts: int,
                      processes: int) -> int:
  """``data`` for the default mesh: every device, or the most that the batch
  (given, or the data set's size) can be split over.

  Args:
    batch: the global batch, or ``None`` when it is the default's to choose.
    n_train: training examples.
    n_devices: devices available.
    parts: micro-steps each replica's batch is cut into (``grad_accum``).
    processes: processes taking part (the mesh is narrowed only with one).
  """
  examples = batch if batch is not None else min(DEFAULTS["data.batch_size"], n_train)
  if examples >= n_devices * parts:
    return n_devices  # a given batch that does not divide is reported as given
  if batch is None:
    data = examples // parts
  else:
    data = max((d for d in range(1, n_devices + 1) if batch % (d * parts) == 0), default=0)
  if data < 1:
    source = f"global batch size {batch}" if batch is not None else (
        f"the data set's {n_train} examples")
    raise MeshnetError(
        f"{source} cannot be cut into grad_accum={parts} micro-steps; lower --grad-accum"
        + (f" or use a batch size that is a multiple of {parts}" if batch is not None else ""))
  if processes > 1:
    raise MeshnetError(
        f"a global batch of {examples} cannot be split over the {n_devices} devices of "
        f"{processes} processes (data={n_devices}); use fewer processes, or a "
        f"--batch-size that is a multiple of {n_devices * parts}")
  return data


def resolve_defaults(config: Config, dataset, n_devices: int, *, processes: int = 1,
                     saved: Mapping[str, Any] | None = None,
                     builds_model: bool = True) -> Resolved:
  """Fills the fields of ``config`` that were not given (``None``).

  ``meshnet.train.run`` calls it, so ``meshnet train`` and Python runs
  resolve alike. Resolving a resolved config changes nothing.

  Args:
    config: the run's configuration; ``None`` fields were not given.
    dataset: the :class:`~meshnet.data.Dataset` trained on (its ``name``
      picks the recipe, its ``x_train`` sizes the batch).
    n_devices: devices the run may use (``len(select_devices(...))``).
    processes: processes taking part; the default mesh is only narrowed to
      fewer devices with one process.
    saved: ``Config.to_dict()`` of the checkpoint being resumed, if any.
    builds_model: whether the run builds ``config.model`` (else a model was
      given, and its fields are filled silently).

  Returns:
    ``(config, notes)``: see :class:`Resolved`.

  Raises:
    MeshnetError: a mesh that does not fit ``n_devices``, or a data set too
      small to split over the mesh that was given.
  """
  inherited = _inheritable(saved, config) if config.checkpoint.resume else {}
  values, notes = _fill_fields(config, dataset.name, inherited, builds_model)
  mesh, batch, fit_notes = _fit_batch_and_mesh(
      config, len(dataset.x_train), dataset.name, n_devices, processes,
      inherited.get("data.batch_size"))
  values["data.batch_size"] = batch
  sections: dict[str, dict[str, Any]] = {}
  for field, value in values.items():
    section, name = field.split(".")
    sections.setdefault(section, {})[name] = value
  config = dataclasses.replace(
      config, mesh=mesh,
      **{name: dataclasses.replace(getattr(config, name), **fields)
         for name, fields in sections.items()})
  return Resolved(config, notes + fit_notes)


def _fill_fields(config: Config, name: str, inherited: dict[str, Any], builds_model: bool
                 ) -> tuple[dict[str, Any], list[str]]:
  """Every field of :data:`DEFAULTS` but the batch: its value (given, the
  checkpoint's, the recipe's or the default), with a note for each that was
  not given and differs from the default (and matters to this run)."""
  recipe = RECIPES.get(name, {})
  values: dict[str, Any] = {}
  notes: list[str] = []
  for field, default in DEFAULTS.items():
    value = _get(config, field)
    if field == "data.batch_size":
      continue  # fitted to the mesh: _fit_batch_and_mesh
    if value is None:
      if field in inherited:
        value, why = inherited[field], "the checkpoint's"
      else:
        value, why = recipe.get(field, default), f"{name} recipe"
      shown = builds_model or not field.startswith("model.")
      applies = field != "train.epochs" or config.train.steps is None
      if value != default and shown and applies:
        notes.append(f"{_LABELS[field]} {_show(value)} ({why}; default {_show(default)})")
    values[field] = value
  return values, notes


def _fit_batch_and_mesh(config: Config, n_train: int, name: str, n_devices: int,
                        processes: int, inherited_batch: int | None
                        ) -> tuple[MeshConfig, int, list[str]]:
  """The mesh with concrete sizes (the default one narrowed to what the batch
  can be split over), the global batch, and their notes (the batch's first:
  the mesh is fitted to it)."""
  mesh, notes = config.mesh, []
  batch = config.data.batch_size if config.data.batch_size is not None else inherited_batch
  axes = resolve_axis_sizes(n_devices, **mesh.axes())  # a given mesh must fit exactly
  parts, what = _micro_steps(config, axes)
  narrowed = False
  if mesh.is_default:
    data = _fit_default_mesh(batch, n_train, n_devices, parts, processes)
    narrowed = data != n_devices
    axes = {axis: 1 for axis in AXES} | {DATA: data}
    mesh = dataclasses.replace(mesh, **axes, devices=data if narrowed else mesh.devices)
  else:
    mesh = dataclasses.replace(mesh, **axes)
  if config.data.batch_size is None:
    batch = _default_batch(batch, n_train, axes[DATA] * axes[FSDP], parts, what, name, notes,
                           split=f"data={axes[DATA]}" + (
                               f" x fsdp={axes[FSDP]}" if axes[FSDP] > 1 else ""))
  if narrowed:
    notes.append(f"mesh data={axes[DATA]} on {axes[DATA]} of the {n_devices} devices (a "
                 f"batch of {batch} cannot be split over {n_devices}; default "
                 f"data={n_devices})")
  return mesh, batch, notes


def _default_batch(inherited: int | None, n_train: int, data: int, parts: int, what: str,
                   name: str, notes: list[str], *, split: str | None = None) -> int:
  """The global batch when none was given: the checkpoint's, else the
  smaller of the default and the training set, rounded down to a multiple of
  ``data * parts`` (``data``: the devices the batch is split over, described
  by ``split``); with a note when it is not the default."""
  split_axes = split or f"data={data}"
  default = DEFAULTS["data.batch_size"]
  if inherited is not None:
    if inherited != default:
      notes.append(f"batch size {inherited} (the checkpoint's; default {default})")
    return inherited
  unit = data * parts
  cap = min(default, n_train)
  batch = cap // unit * unit
  if batch < 1:
    split = split_axes + (f" x {what}" if parts > 1 else "")
    raise MeshnetError(
        f"dataset {name} has {n_train} training examples, fewer than {split} = {unit} "
        f"(one example per device and micro-step); use a smaller --mesh"
        + (" or --grad-accum" if parts > 1 else ""))
  if batch != default:
    why = (f"the data set has {n_train} examples" if n_train < default else "")
    if batch != cap:
      split = split_axes + (f" x {what}" if parts > 1 else "")
      why += ("; " if why else "") + f"rounded down to a multiple of {split} = {unit}"
    notes.append(f"batch size {batch} ({why}; default {default})")
  return batch
