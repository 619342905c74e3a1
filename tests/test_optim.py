"""Optimizers as PyTorch users know them (issue 11, part 4): weight decay is an
L2 term added to the (clipped) gradient for sgd, momentum and adam, decoupled
for adamw. Trajectories are compared with PyTorch's formulas written out in
numpy, and with torch itself when it is installed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet import cli
from meshnet.config import OptimConfig

STEPS, LR, WD, MU, EPS = 8, 0.05, 0.1, 0.9, 1e-8
B1, B2 = 0.9, 0.999


def _problem():
  """Least squares ``mean((x @ w + b - y)^2)``: x [16, 3], y [16, 2]."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
  params = {"b": rng.normal(size=(2,)), "w": rng.normal(size=(3, 2))}
  return x, y, params


def _numpy_grad(params, x, y):
  r = 2 * (x @ params["w"] + params["b"] - y) / y.size
  return {"b": r.sum(0), "w": x.T @ r}


def _clip(grads, max_norm):
  """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when
  below 1 (optax's clip_by_global_norm divides by the norm itself: the two
  differ by about 1e-6 relative, far below the tolerance of the comparison
  with meshnet)."""
  if max_norm is None:
    return grads
  norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
  scale = min(1.0, max_norm / (norm + 1e-6))
  return {k: g * scale for k, g in grads.items()}


def _torch_formulas(name, params, x, y, *, clip_norm=None):
  """The trajectory PyTorch's SGD / SGD(momentum) / Adam (weight_decay=WD) or
  AdamW(weight_decay=WD) take, in float64 numpy, as torch documents them."""
  p = {k: v.copy() for k, v in params.items()}
  state = {k: {"m": np.zeros_like(v), "v": np.zeros_like(v), "b": None} for k, v in p.items()}
  trajectory = []
  for t in range(1, STEPS + 1):
    grads = _clip(_numpy_grad(p, x, y), clip_norm)  # clip_grad_norm_ before step()
    for k in p:
      g, s = grads[k], state[k]
      if name != "adamw":
        g = g + WD * p[k]  # weight_decay: the L2 term joins the gradient
      if name == "sgd":
        p[k] = p[k] - LR * g
      elif name == "momentum":  # dampening 0, nesterov False: the first b is g
        s["b"] = g if s["b"] is None else MU * s["b"] + g
        p[k] = p[k] - LR * s["b"]
      else:
        if name == "adamw":
          p[k] = p[k] * (1 - LR * WD)  # decoupled: decay the weights, not the gradient
        s["m"] = B1 * s["m"] + (1 - B1) * g
        s["v"] = B2 * s["v"] + (1 - B2) * g * g
        m_hat, v_hat = s["m"] / (1 - B1 ** t), s["v"] / (1 - B2 ** t)
        p[k] = p[k] - LR * m_hat / (np.sqrt(v_hat) + EPS)
    trajectory.append({k: v.copy() for k, v in p.items()})
  return trajectory


def _meshnet(name, params, x, y, *, clip_norm=None, weight_decay=WD):
  """meshnet's optimizer on the same problem, in float32 JAX."""
  optimizer = meshnet.make_optimizer(
      OptimConfig(name, lr=LR, weight_decay=weight_decay, momentum=MU, clip_norm=clip_norm),
      STEPS)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)
  state = optimizer.init(p)
  trajectory = []
  for _ in range(STEPS):
    updates, state = optimizer.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
    trajectory.append(jax.tree.map(np.asarray, p))
  return trajectory


def _assert_same(got, expected):
  """Every step's parameters, float32 against float64: within 1e-5 (a step
  moves them by up to LR = 0.05; weight decay changes them by > 1e-3)."""
  for step, (a, b) in enumerate(zip(got, expected, strict=True), 1):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {step}, {k}")


@pytest.mark.parametrize("clip_norm", [None, 0.5])
@pytest.mark.parametrize("name", ["adam", "sgd", "momentum", "adamw"])
def test_weight_decay_follows_pytorchs_formulas(name, clip_norm):
  x, y, params = _problem()
  expected = _torch_formulas(name, params, x, y, clip_norm=clip_norm)
  _assert_same(_meshnet(name, params, x, y, clip_norm=clip_norm), expected)


@pytest.mark.parametrize("name", ["adam", "sgd", "momentum", "adamw"])
def test_weight_decay_changes_the_trajectory(name):
  x, y, params = _problem()
  with_decay = _meshnet(name, params, x, y)[-1]["w"]
  without = _meshnet(name, params, x, y, weight_decay=0.0)[-1]["w"]
  assert np.abs(with_decay - without).max() > 1e-3


@pytest.mark.parametrize("clip_norm", [None, 0.5])
@pytest.mark.parametrize("name", ["adam", "sgd", "momentum", "adamw"])
def test_the_formulas_are_torchs_own(name, clip_norm):
  """The numpy reference against torch.optim itself (skipped without torch)."""
  torch = pytest.importorskip("torch")
  x, y, params = _problem()
  p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
  make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=LR, weight_decay=WD),
          "momentum": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MU, weight_decay=WD),
          "adam": lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=WD, eps=EPS),
          "adamw": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, eps=EPS)}[name]
  optimizer = make([p["b"], p["w"]])
  tx, ty = torch.tensor(x), torch.tensor(y)
  trajectory = []
  for _ in range(STEPS):
    optimizer.zero_grad()
    torch.mean((tx @ p["w"] + p["b"] - ty) ** 2).backward()
    if clip_norm is not None:
      torch.nn.utils.clip_grad_norm_([p["b"], p["w"]], clip_norm)
    optimizer.step()
    trajectory.append({k: v.detach().numpy().copy() for k, v in p.items()})
  expected = _torch_formulas(name, params, x, y, clip_norm=clip_norm)
  for a, b in zip(trajectory, expected, strict=True):
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9)
  _assert_same(_meshnet(name, params, x, y, clip_norm=clip_norm), trajectory)


def test_adam_without_decay_keeps_its_state_structure():
  p = {"w": jnp.ones((2, 2))}
  plain = meshnet.make_optimizer(OptimConfig("adam", lr=LR), 10)
  reference = optax.adam(optax.constant_schedule(LR))
  assert jax.tree.structure(plain.init(p)) == jax.tree.structure(reference.init(p))


def test_the_seed_mnist_recipe_runs(capsys):
  """``--optimizer adam --weight-decay 1e-5`` (PyTorch's Adam(weight_decay=1e-5))
  used to be refused."""
  assert cli.main(["train", "--optimizer", "adam", "--weight-decay", "1e-5", "--steps", "3",
                   "--hidden", "32", "--eval-every", "0", "--no-progress"]) == 0
  assert "optimizer adam" in capsys.readouterr().err
