"""Pictures of a schedule: text for the terminal, PNG for reports.

Stages are rows and ticks columns; ``F``/``B``/``W`` cells carry the
microbatch (and ``.c`` the chunk when there are several), idle cells are
``.``; the title gives the bubble.
"""

from __future__ import annotations

from meshnet.pipeline.schedules import Schedule

_COLOURS = {"F": "#4c9be8", "B": "#e8874c", "W": "#5cb85c"}


def title(schedule: Schedule) -> str:
  s = schedule
  chunks = f", v={s.virtual_stages}" if s.virtual_stages > 1 else ""
  return (f"{s.name}: S={s.num_stages}, M={s.num_microbatches}{chunks}, "
          f"{s.num_ticks} ticks, bubble {s.bubble:.1%} (idle ticks {s.tick_bubble:.1%})")


def text(schedule: Schedule) -> str:
  """The schedule as a text grid, one line per stage."""
  cells = [["." if op is None else str(op) for op in row] for row in schedule.table]
  width = max(len(c) for row in cells for c in row)
  lines = [title(schedule)]
  for d in range(schedule.num_stages):
    lines.append(f"stage {d}: " + " ".join(row[d].rjust(width) for row in cells))
  return "\n".join(lines)


def save_png(schedule: Schedule, path: str) -> str:
  """Draws the schedule to ``path`` (PNG): one coloured box per op."""
  # A bare Figure, not pyplot: the caller's backend (a notebook's inline
  # plots) is left as it was.
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch, Rectangle

  S, T = schedule.num_stages, schedule.num_ticks
  fig = Figure(figsize=(max(6.0, 0.32 * T + 1.5), 0.55 * S + 1.4))
  ax = fig.subplots()
  for t, row in enumerate(schedule.table):
    for d, op in enumerate(row):
      if op is None:
        ax.add_patch(Rectangle((t, d), 1, 1, facecolor="#f2f2f2", edgecolor="white"))
        continue
      ax.add_patch(Rectangle((t, d), 1, 1, facecolor=_COLOURS[op.kind], edgecolor="white"))
      label = str(op.microbatch) + (f".{op.chunk}" if schedule.virtual_stages > 1 else "")
      ax.text(t + 0.5, d + 0.5, label, ha="center", va="center", fontsize=7)
  ax.set_xlim(0, T)
  ax.set_ylim(S, 0)
  ax.set_yticks([d + 0.5 for d in range(S)], [f"stage {d}" for d in range(S)])
  ax.set_xlabel("tick")
  ax.set_title(title(schedule), fontsize=9)
  kinds = ["F", "B", "W"] if schedule.split_backward else ["F", "B"]
  names = {"F": "forward", "B": "backward (input)" if schedule.split_backward else
           "backward", "W": "backward (weights)"}
  ax.legend(handles=[Patch(color=_COLOURS[k], label=names[k]) for k in kinds] +
            [Patch(color="#f2f2f2", label="idle")], loc="upper left",
            bbox_to_anchor=(1.0, 1.0), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
