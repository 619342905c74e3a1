"""meshnet: pure-JAX distributed training.

Models are pure functions (:class:`Model`: ``init``, ``apply``); parallelism
is mesh axes (:func:`make_mesh`: ``data``, ``fsdp``, ``stage``, ``tensor``);
a training step is ``state, metrics = step(state, batch)``.
"""

from meshnet import checkpoint, cli, collectives, data, losses, models, nn, pipeline, sharding, train
from meshnet.config import (
    Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, PipelineConfig, TrainConfig,
)
from meshnet.data import BatchSampler, Dataset, global_batch, load_dataset
from meshnet.defaults import resolve_defaults
from meshnet.errors import MeshnetError, NonFiniteLossError, NonFiniteStateError
from meshnet.mesh import (
    AXES, DATA, FSDP, STAGE, TENSOR, describe_mesh, make_mesh, set_cpu_device_count,
)
from meshnet.model import Model, sequential
from meshnet.pipeline import make_pipeline
from meshnet.optim import make_optimizer
from meshnet.step import (
    TrainState, init_train_state, make_eval_step, make_grad_fn, make_train_step,
)

__version__ = "0.1.0"

__all__ = [
    "AXES", "BatchSampler", "checkpoint", "Config", "DATA", "DataConfig", "Dataset", "FSDP",
    "MeshConfig", "MeshnetError", "Model", "ModelConfig", "NonFiniteLossError", "NonFiniteStateError",
    "OptimConfig", "PipelineConfig", "STAGE", "TENSOR", "TrainConfig", "TrainState", "collectives",
    "data", "describe_mesh", "global_batch", "init_train_state", "load_dataset",
    "losses", "make_eval_step", "make_grad_fn", "make_mesh", "make_optimizer",
    "make_pipeline", "make_train_step", "models", "nn", "pipeline", "resolve_defaults",
    "sequential",
    "set_cpu_device_count", "sharding", "train",
]
