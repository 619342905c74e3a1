"""Loss and accuracy curves from JSON-lines metrics files (``--metrics-file``).

:func:`plot_metrics` draws one or several runs on one figure with two
panels: loss (training loss solid, evaluation loss dashed, one colour per
run) and, when any run has it, evaluation accuracy. ``meshnet plot`` is this
function behind a flag parser::

    meshnet plot runs/a.jsonl runs/b.jsonl --labels adam,sgd -o loss.png

A file holds training records (``step``, ``loss``, ...) and evaluation
records (``step``, ``eval_loss``, ``eval_accuracy``), see
:class:`~meshnet.metrics.MetricsWriter`; records with a ``kind`` (the run
record a run writes first) describe the run and are skipped. When a step shows up again (a run
resumed from an earlier checkpoint and appended), the later records replace
the earlier ones from that step on, as TensorBoard does.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np

from meshnet.errors import MeshnetError
from meshnet.metrics import nearest_existing

Series = tuple[np.ndarray, np.ndarray]  # (steps [N] int64, values [N] float64)
_FIELDS = {"train_loss": "loss", "eval_loss": "eval_loss", "eval_accuracy": "eval_accuracy"}


class Curves(NamedTuple):
  """One run's curves, each ``(steps [N], values [N])`` (``N`` may be 0).

  Attributes:
    label: the run's name in the legend.
    train_loss: ``loss`` of the training records.
    eval_loss: ``eval_loss`` of the evaluation records.
    eval_accuracy: ``eval_accuracy`` of the evaluation records (a fraction).
  """

  label: str
  train_loss: Series
  eval_loss: Series
  eval_accuracy: Series


def _drop_from(points: list[tuple[int, float]], step: int) -> None:
  while points and points[-1][0] >= step:
    points.pop()


def read_curves(path: str, label: str | None = None) -> Curves:
  """The curves in metrics file ``path``.

  Blank lines are skipped, and so are records with a ``kind`` (the run
  record) and a last line that is cut short (no newline and not JSON: a run
  still writing it, or killed while it did).

  Args:
    path: a JSON-lines metrics file.
    label: the legend name (default: the file name without its extension).

  Raises:
    MeshnetError: the file is missing or unreadable, a line is not a JSON
      object with an integer ``step`` (naming the file and line), or the
      file holds no loss records.
  """
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    raise MeshnetError(f"metrics file {path} not found; give files written by "
                       "meshnet train --metrics-file") from None
  except (OSError, UnicodeDecodeError) as e:
    reason = getattr(e, "strerror", None) or type(e).__name__
    raise MeshnetError(f"cannot read metrics file {path} ({reason})") from None
  points: dict[str, list[tuple[int, float]]] = {name: [] for name in _FIELDS}
  records = 0
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      if number == len(lines) and not line.endswith("\n"):
        break  # being written, or cut by a kill
      raise MeshnetError(f"{path} line {number} is not JSON ({e.msg}); a metrics file "
                         "holds one JSON object per line") from None
    if isinstance(record, dict) and isinstance(record.get("kind"), str):
      continue  # the run record (or another description): no curve
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
      raise MeshnetError(f"{path} line {number} is not a metrics record (a JSON object "
                         f"with an integer \"step\"): {line.strip()[:80]}")
    records += 1
    values = {name: float(record[field]) for name, field in _FIELDS.items()
              if isinstance(record.get(field), (int, float))
              and not isinstance(record.get(field), bool)}
    # A step at or before the last one of its kind: a run resumed from an
    # earlier step appended; its records replace the old ones from there on
    # (a training record restarts every curve, an evaluation record its own).
    restarted = [n for n in values if points[n] and points[n][-1][0] >= step]
    if "train_loss" in restarted:
      restarted = list(points)
    for name in restarted:
      _drop_from(points[name], step)
    for name, value in values.items():
      points[name].append((step, value))
  if not records:
    raise MeshnetError(f"metrics file {path} holds no records (a run writes its first at "
                       "step --log-every); give a file written by meshnet train "
                       "--metrics-file")
  if not points["train_loss"] and not points["eval_loss"]:
    raise MeshnetError(f"metrics file {path} holds no loss records; give a file written "
                       "by meshnet train --metrics-file")
  series = {name: (np.array([s for s, _ in p], np.int64), np.array([v for _, v in p]))
            for name, p in points.items()}
  return Curves(label if label is not None else _stem(path), **series)


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _labels(paths: Sequence[str], labels: Sequence[str] | None) -> list[str]:
  """The given labels, or file stems made unique with their directories."""
  if labels is not None:
    if len(labels) != len(paths):
      raise MeshnetError(f"{len(labels)} labels ({', '.join(labels)}) for {len(paths)} "
                         "metrics files; give one label per file")
    return list(labels)
  stems = [_stem(p) for p in paths]
  return [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), s)
          if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def _spans_decades(values: Sequence[np.ndarray], decades: float = 3.0) -> bool:
  """True if the finite values are all positive and span more than
  ``decades`` powers of ten (then a linear axis flattens all but the largest)."""
  finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
  if finite.size < 2 or finite.min() <= 0:
    return False
  return bool(np.log10(finite.max() / finite.min()) > decades)


def _check_output(output: str) -> None:
  full = os.path.abspath(output)
  if os.path.isdir(full):
    raise MeshnetError(f"output {output} is a directory; give a file name, e.g. "
                       f"{os.path.join(output, 'loss.png')}")
  parent = nearest_existing(full)
  if not os.path.isdir(parent):
    raise MeshnetError(f"output {output} cannot be created: {parent} is a file")


def plot_metrics(paths: Sequence[str], output: str, *,
                 labels: Sequence[str] | None = None, title: str | None = None
                 ) -> list[Curves]:
  """Draws the loss and accuracy curves of metrics files into one picture.

  Args:
    paths: JSON-lines metrics files (``meshnet train --metrics-file``).
    output: the picture; its extension picks the format (``.png``, ``.pdf``,
      ``.svg``; none: PNG, under exactly this name). Missing parent
      directories are created. The loss axis is logarithmic when the losses
      span more than three powers of ten (e.g. a diverged run).
    labels: one legend name per file (default: file names without extension).
    title: a title over the panels.

  Returns:
    The curves drawn, one :class:`Curves` per file, in order.

  Raises:
    MeshnetError: no files, a bad file (see :func:`read_curves`), labels that
      do not match the files, or an output that cannot be written.
  """
  if not paths:
    raise MeshnetError("no metrics files to plot; give one or more JSON-lines files "
                       "written by meshnet train --metrics-file")
  curves = [read_curves(p, label) for p, label in zip(paths, _labels(paths, labels))]
  _check_output(output)
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import PercentFormatter

  with_accuracy = any(c.eval_accuracy[0].size for c in curves)
  panels = 2 if with_accuracy else 1
  fig = Figure(figsize=(5.5 * panels, 4.0), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, panels, squeeze=False)[0]
  loss_ax = axes[0]
  for i, c in enumerate(curves):
    colour = f"C{i % 10}"
    if c.train_loss[0].size:  # one point draws no line: mark it
      loss_ax.plot(*c.train_loss, color=colour, label=f"{c.label} train",
                   marker="o" if c.train_loss[0].size == 1 else None)
    if c.eval_loss[0].size:
      loss_ax.plot(*c.eval_loss, color=colour, linestyle="--", marker=".",
                   label=f"{c.label} eval")
    if with_accuracy and c.eval_accuracy[0].size:
      axes[1].plot(*c.eval_accuracy, color=colour, linestyle="--", marker=".",
                   label=f"{c.label} eval")
  loss_ax.set_title("loss")
  if _spans_decades([c.train_loss[1] for c in curves] + [c.eval_loss[1] for c in curves]):
    loss_ax.set_yscale("log")  # a diverged run next to a good one: both stay visible
  if with_accuracy:
    axes[1].set_title("accuracy")
    axes[1].yaxis.set_major_formatter(PercentFormatter(1.0))
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  parent = os.path.dirname(os.path.abspath(output))
  # The extension picks the format; none is PNG, written under the name given
  # (matplotlib alone would write ``loss.png`` for ``-o loss``).
  extension = os.path.splitext(output)[1][1:].lower()
  try:
    os.makedirs(parent, exist_ok=True)
    fig.savefig(output, format=extension or "png")
  except ValueError as e:  # an extension matplotlib cannot write
    raise MeshnetError(f"cannot write {output}: {e}; use .png, .pdf or .svg") from None
  except OSError as e:
    raise MeshnetError(f"cannot write {output} ({e.strerror or type(e).__name__}); "
                       "choose another -o") from None
  return curves
