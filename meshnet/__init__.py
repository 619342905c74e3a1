"""meshnet: pure-JAX distributed training.

Models are pure functions (:class:`Model`: ``init``, ``apply``); parallelism
is mesh axes (:func:`make_mesh`: ``data``, ``fsdp``, ``stage``, ``tensor``);
a training step is ``state, metrics = step(state, batch)``.
"""

from meshnet import (
    checkpoint, cli, collectives, commbench, corpus, data, distributed, faults, fetch, flops,
    hardware, losses, models, nn, pipeline, planner, profiling, runcost, sample, sharding, train,
)
from meshnet.commbench import BenchConfig, run_bench
from meshnet.config import (
    Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, PipelineConfig, TrainConfig,
)
from meshnet.data import (
    BatchSampler, Dataset, TextDataset, default_data_dir, global_batch, load_dataset,
)
from meshnet.defaults import resolve_defaults
from meshnet.distributed import initialize
from meshnet.errors import (
    DiskFullError, DownloadError, MeshnetError, NonFiniteLossError, NonFiniteStateError,
)
from meshnet.faults import EXIT_PEER_FAILED
from meshnet.fetch import fetch_mnist
from meshnet.mesh import (
    AXES, DATA, FSDP, STAGE, TENSOR, describe_mesh, make_mesh, set_cpu_device_count,
)
from meshnet.model import Model, sequential
from meshnet.models import from_flax, from_nnx
from meshnet.pipeline import make_pipeline
from meshnet.optim import make_optimizer
from meshnet.planner import Plan, PlanConfig, format_plan, plan
from meshnet.plot import plot_metrics
from meshnet.profile_report import ProfileSummary, format_profile, profile_summary
from meshnet.profiling import StepProfiler
from meshnet.runcost import (
    ParamRow, bytes_per_device, device_bytes, format_param_table, param_table, run_record,
)
from meshnet.sample import generate, sample_checkpoint
from meshnet.sharding import DEFAULT_RULES, logical_to_mesh, param_shardings, param_specs
from meshnet.step import (
    TrainState, init_train_state, make_eval_step, make_grad_fn, make_train_step,
)
from meshnet.tensorboard import TensorBoardWriter

__version__ = "0.1.0"

__all__ = [
    "AXES", "BatchSampler", "checkpoint", "Config", "DATA", "DataConfig", "Dataset", "FSDP",
    "MeshConfig", "MeshnetError", "Model", "ModelConfig", "NonFiniteLossError", "NonFiniteStateError",
    "OptimConfig", "PipelineConfig", "STAGE", "TENSOR", "TrainConfig", "TrainState", "collectives",
    "data", "describe_mesh", "distributed", "global_batch", "init_train_state", "initialize",
    "load_dataset",
    "losses", "make_eval_step", "make_grad_fn", "make_mesh", "make_optimizer",
    "make_pipeline", "make_train_step", "models", "nn", "pipeline", "plot_metrics",
    "resolve_defaults", "sequential", "set_cpu_device_count", "sharding", "TensorBoardWriter",
    "train", "default_data_dir", "DownloadError", "fetch", "fetch_mnist", "faults",
    "EXIT_PEER_FAILED", "DiskFullError", "ProfileSummary", "StepProfiler", "format_profile",
    "profile_summary", "profiling", "BenchConfig", "commbench", "run_bench",
    "DEFAULT_RULES", "from_flax", "from_nnx", "logical_to_mesh", "param_shardings",
    "param_specs", "Plan", "PlanConfig", "format_plan", "hardware", "plan", "planner", "flops",
    "TextDataset", "corpus", "generate", "sample", "sample_checkpoint",
    "runcost", "ParamRow", "bytes_per_device", "device_bytes", "format_param_table",
    "param_table", "run_record",
]
