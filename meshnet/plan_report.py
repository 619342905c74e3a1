"""``meshnet plan``'s printout: the :class:`~meshnet.planner.Plan` as text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
  from meshnet.planner import Plan




def _size(nbytes: float | None) -> str:
  if nbytes is None:
    return "-"
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if nbytes >= scale:
      return f"{nbytes / scale:.2f} {unit}"
  return f"{int(nbytes)} B"


def _time(seconds: float) -> str:
  if seconds == 0:
    return "-"
  if seconds >= 1:
    return f"{seconds:.2f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.2f} ms"
  return f"{seconds * 1e6:.1f} us"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """Columns padded to their widest cell; the first left-aligned, the rest right."""
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

  def line(cells):
    return "  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                            for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  return [line(header)] + [line(r) for r in rows]


def _header(plan: "Plan") -> list[str]:
  c, dev = plan.config, plan.config.device
  model = (f"{c.label} {'-'.join(map(str, c.widths))} ({plan.num_params:,} parameters)"
           if c.widths else f"a model of {plan.num_params:,} parameters")
  where = f"mesh {c.mesh_text()} ({c.devices} device{'s' * (c.devices > 1)}, {dev.kind})"
  if plan.pipeline:
    p = plan.pipeline
    where += (f"; pipeline {p['schedule']}"
              + (f" v={p['virtual_stages']}" if p["virtual_stages"] > 1 else "")
              + f", {p['microbatches']} microbatches of {p['microbatch']}, layers per "
              f"stage {p['layers_per_stage']}, {p['rounds']} rounds"
              + (", remat" if p["remat"] else ""))
  elif c.grad_accum > 1:
    where += f"; grad_accum {c.grad_accum}"
  return [f"meshnet plan: {model}, {c.optim.optimizer}, global batch {c.batch_size}", where,
          f"device: {dev.flops / 1e9:,.1f} GFLOP/s, memory {dev.memory_bandwidth / 1e9:.1f} "
          f"GB/s ({dev.source}); links: {dev.link.describe()}"]


def _memory(plan: "Plan") -> list[str]:
  m, xla, dev = plan.memory, plan.xla, plan.config.device
  header = ["per device", "plan"] + ([f"XLA ({xla.platform})", "plan/XLA"] if xla else [])

  def row(name, value, xla_value=None):
    cells = [name, _size(value)]
    if xla:
      cells.append(_size(xla_value) if xla_value is not None else "")
      cells.append(f"{value / xla_value:.2f}" if xla_value and value is not None else "")
    return cells

  activations = "activations (ring buffers)" if plan.pipeline else "activations (kept)"
  lines = _table(header, [
      row("parameters", m.params), row("gradients", m.grads),
      row("optimizer state", m.optimizer), row(activations, m.activations),
      row("XLA arguments", m.arguments, xla.arguments if xla else None),
      row("XLA outputs", m.outputs, xla.outputs if xla else None),
      row("XLA temporaries", m.temporaries, xla.temporaries if xla else None)])
  if dev.memory_bytes and m.temporaries is not None:
    # Donated: the new state reuses the old one's buffers.
    peak = m.arguments + m.temporaries + (m.outputs - m.params - m.optimizer)
    lines.append(f"  peak about {_size(peak)} of {_size(dev.memory_bytes)} device memory"
                 + ("" if peak <= dev.memory_bytes else ": does NOT fit"))
  return lines


def _step(plan: "Plan") -> list[str]:
  s = plan.step
  rows = [[f"{t.axis} axis", _size(t.bytes_sent),
           ", ".join(f"{n} {name}" for name, n in t.calls.items()), _time(t.seconds)]
          for t in plan.traffic]
  lines = (_table(["per step", "sent per device", "collectives", "time"], rows) if rows
           else ["  per step: no collectives (one device)"])
  lines.append(f"  compute {_time(s.compute_s)} ({s.flops / 1e9:.3g} GFLOP"
               + (f", bubble {s.bubble:.1%}" if plan.pipeline else "")
               + f"), communication {_time(s.comm_s)}: step {_time(s.step_s)}, "
               f"{s.samples_per_s:,.0f} samples/s"
               + (f", {s.speedup:.2f}x {_base(plan)}" if s.speedup else ""))
  return lines


def _base(plan: "Plan") -> str:
  """What the speedups are against."""
  c = plan.config
  shard = c.mesh.fsdp * c.mesh.tensor
  return "one device" if shard == 1 else f"data=1 on {shard} devices"


def _projection(plan: "Plan") -> list[str]:
  c = plan.config
  pipelined = f" x stage={c.stages}" if c.stages > 1 else ""
  if c.mesh.fsdp > 1 or c.mesh.tensor > 1:
    pipelined = f" x fsdp={c.mesh.fsdp} x tensor={c.mesh.tensor}"
  rows = [[str(r.devices), r.mesh, str(r.local_batch), _time(r.compute_s), _time(r.comm_s),
           f"{r.bubble:.1%}" if r.bubble else "-", _time(r.step_s), f"{r.samples_per_s:,.0f}",
           f"{r.speedup:.2f}x" if r.speedup else "-", _size(r.temporaries)]
          for r in plan.scaling]
  return [f"projection: global batch {c.batch_size} on 1, 2, 4, ... devices (data "
          f"parallel{pipelined})"] + _table(
      ["devices", "mesh", "batch/replica", "compute", "comm", "bubble", "step", "samples/s",
       "speedup", "temp"], rows)


def format_plan(plan: "Plan") -> str:
  """The plan as text: a header, per-device memory (plan beside XLA when
  compiled), per-step traffic and time, and the scaling projection."""
  lines = (_header(plan) + [""] + _memory(plan) + [""] + _step(plan) + [""]
           + _projection(plan) + [f"note: {note}" for note in plan.notes])
  return "\n".join(lines)
