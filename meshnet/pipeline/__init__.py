"""Pipeline parallelism over the ``stage`` mesh axis.

``make_pipeline(model, mesh, example_shape, schedule=..., microbatches=...)``
cuts a model made of layers into stages and returns a :class:`Pipeline`
whose ``make_grad_fn`` is one ``shard_map`` program that follows a schedule
table; :func:`meshnet.make_train_step` takes it as ``pipeline=``.
Schedules are data (:mod:`meshnet.pipeline.schedules`); :func:`timeline`
draws them.
"""

from meshnet.pipeline import schedules
from meshnet.pipeline.executor import Pipeline, make_pipeline
from meshnet.pipeline.schedules import SCHEDULES, Op, Schedule, custom, make_schedule
from meshnet.pipeline.stages import balanced_bounds, default_bounds
from meshnet.pipeline.timeline import save_png, text


def timeline(schedule: Schedule, path: str | None = None) -> str:
  """The schedule as text (returned); also a PNG at ``path`` if given."""
  if path is not None:
    save_png(schedule, path)
  return text(schedule)


__all__ = ["Op", "Pipeline", "SCHEDULES", "Schedule", "balanced_bounds", "custom",
           "default_bounds", "make_pipeline", "make_schedule", "save_png", "schedules",
           "text", "timeline"]
