"""bf16 on a GPT: a tiny GPT trained through ``meshnet.train.run`` on the
embedded text corpus reaches, with ``precision="bf16"``, a validation loss
within 2% of float32's after the same steps, on float32 masters."""

import jax
import jax.numpy as jnp
import numpy as np

from meshnet.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig,
                            OptimConfig, TrainConfig)
from meshnet.train import run

STEPS = 40


def _train(tmp_path, precision):
  config = Config(
      mesh=MeshConfig(devices=1),
      model=ModelConfig(name="gpt", layers=2, heads=4, width=32, context=32),
      data=DataConfig(dataset="text", batch_size=32), optim=OptimConfig(lr=3e-3),
      checkpoint=CheckpointConfig(dir=str(tmp_path / precision)),
      train=TrainConfig(steps=STEPS, eval_every=STEPS, log_every=1, progress=False, seed=0,
                        precision=precision))
  return run(config, log=lambda _: None)


def test_bf16_gpt_validation_loss_is_within_two_percent_of_fp32(tmp_path):
  fp32, bf16 = _train(tmp_path, "fp32"), _train(tmp_path, "bf16")
  fp32_losses, bf16_losses = ([r["loss"] for r in result.history if "loss" in r]
                              for result in (fp32, bf16))
  assert len(fp32_losses) == len(bf16_losses) == STEPS
  first = fp32_losses[0]
  assert fp32.eval["eval_loss"] < first - 1.0, (first, fp32.eval)  # it did learn
  gap = abs(bf16.eval["eval_loss"] - fp32.eval["eval_loss"]) / fp32.eval["eval_loss"]
  print(f"eval_loss fp32 {fp32.eval['eval_loss']:.4f} bf16 {bf16.eval['eval_loss']:.4f} "
        f"gap {gap:.2%} (first loss {first:.3f})")
  assert gap <= 0.02, (fp32.eval, bf16.eval)
  # It did compute in bf16 (the losses differ), on float32 masters and Adam state.
  assert bf16_losses[-1] != fp32_losses[-1] and np.isfinite(bf16_losses[-1])
  for leaf in jax.tree.leaves((bf16.state.params, bf16.state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
