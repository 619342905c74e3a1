"""Text: byte-level windows (``--dataset text``), the embedded corpus, the
sequence loss, bits per byte in evaluation, ``generate`` and ``meshnet sample``."""

import hashlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from meshnet import cli, corpus, data, losses
from meshnet.config import (
    CheckpointConfig, Config, DataConfig, MeshConfig, OptimConfig, TrainConfig,
)
from meshnet.errors import MeshnetError
from meshnet.sample import generate, load_text_model, sample_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
        b"it was the age of foolishness, it was the epoch of belief.\n") * 8


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _meshnet(*argv, timeout=300):
  return subprocess.run([sys.executable, "-m", "meshnet", *argv], capture_output=True,
                        text=True, env=_env(), timeout=timeout)


def _unigram_entropy(text: bytes) -> float:
  counts = np.bincount(np.frombuffer(text, np.uint8), minlength=256)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


# --- the data set -------------------------------------------------------------


def test_windows_are_exact_byte_slices_and_the_split_is_disjoint(tmp_path):
  path = tmp_path / "tale.txt"
  path.write_bytes(TEXT)
  ds = data.load_dataset("text", str(path), context=16)
  n = (len(TEXT) - 1) // 16
  assert isinstance(ds, data.TextDataset) and ds.num_outputs == 256
  assert ds.x_train.dtype == ds.y_train.dtype == np.int32
  assert ds.x_train.shape[1:] == ds.y_test.shape[1:] == (16,)
  assert len(ds.x_test) == round(0.1 * n) and len(ds.x_train) + len(ds.x_test) == n
  assert not set(ds.train_windows) & set(ds.test_windows)  # disjoint, and together all
  assert sorted([*ds.train_windows, *ds.test_windows]) == list(range(n))
  for x, y, windows in ((ds.x_train, ds.y_train, ds.train_windows),
                        (ds.x_test, ds.y_test, ds.test_windows)):
    for row, k in enumerate(windows):
      assert bytes(x[row].astype(np.uint8)) == TEXT[16 * k:16 * k + 16]
      assert bytes(y[row].astype(np.uint8)) == TEXT[16 * k + 1:16 * k + 17]
  assert (ds.corpus_bytes, ds.corpus_sha256) == (len(TEXT), hashlib.sha256(TEXT).hexdigest())
  data.check_dataset(ds)


def test_the_split_is_fixed_by_its_seed(tmp_path):
  path = tmp_path / "tale.txt"
  path.write_bytes(TEXT)
  a, b = data.text(str(path), context=8), data.text(str(path), context=8)
  other = data.text(str(path), context=8, split_seed=1)
  np.testing.assert_array_equal(a.test_windows, b.test_windows)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  assert not np.array_equal(a.test_windows, other.test_windows)
  assert data.fingerprint(a) == data.fingerprint(b)


def test_a_folder_is_its_text_files_in_sorted_order(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("second file")
  (tmp_path / "a.md").write_text("first file, héllo")
  (tmp_path / "sub" / "c.rst").write_text("third, in a subfolder")
  (tmp_path / ".hidden.txt").write_text("never read")
  (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (tmp_path / "empty.txt").write_bytes(b"")
  text, skipped = data.read_text(str(tmp_path))
  assert text.data == "first file, héllo\n\nsecond file\n\nthird, in a subfolder".encode()
  assert [os.path.basename(s) for s in text.sources] == ["a.md", "b.txt", "c.rst"]
  assert sorted(os.path.basename(s) for s in skipped) == ["empty.txt", "latin1.txt",
                                                          "logo.png"]
  ds = data.text(str(tmp_path), context=4)
  assert ds.corpus_bytes == len(text.data) and len(ds.skipped) == 3
  assert "skipped 3 files that are empty or not UTF-8 text" in data.describe_text(ds)


@pytest.mark.parametrize("setup, context, message", [
    (None, 8, "text data {p}/missing not found; give --data-dir a UTF-8 text file or a "
     "folder of them"),
    ("empty-folder", 8, "text folder {p}/in holds no UTF-8 text file (no files)"),
    ("binary-folder", 8, "text folder {p}/in holds no UTF-8 text file (only 1 empty or "
     "non-UTF-8 file, e.g. {p}/in/x.bin)"),
    ("binary-file", 8, "text file {p}/in is not UTF-8 text (a NUL byte at offset 2)"),
    ("latin1-file", 8, "text file {p}/in is not UTF-8 text (byte 0xe9 at offset 3 is not "
     "UTF-8)"),
    ("short-file", 8, "text corpus {p}/in has 8 bytes, fewer than context + 1 = 9 for one "
     "example; use a longer text or a smaller --context"),
    ("short-file", 0, "text context 0 must be an integer >= 1"),
])
def test_bad_text_input_is_one_line(tmp_path, setup, context, message):
  target = tmp_path / ("in" if setup else "missing")
  if setup and setup.endswith("folder"):
    target.mkdir()
    if setup == "binary-folder":
      (target / "x.bin").write_bytes(b"\x00\x01\x02")
  elif setup == "binary-file":
    target.write_bytes(b"ab\x00cd" * 10)
  elif setup == "latin1-file":
    target.write_bytes("caf\xe9 au lait".encode("latin-1"))
  elif setup == "short-file":
    target.write_bytes(b"12345678")
  with pytest.raises(MeshnetError) as e:
    data.text(str(target), context=context)
  assert str(e.value).startswith(message.format(p=tmp_path))
  assert "\n" not in str(e.value)


def test_the_command_refuses_a_missing_text_path_in_one_line(tmp_path, capsys):
  assert cli.main(["train", "--no-progress", "--model", "gpt", "--dataset", "text",
                   "--data-dir", str(tmp_path / "nope")]) == 2
  err = capsys.readouterr().err
  assert err == (f"meshnet: error: text data {tmp_path}/nope not found; give --data-dir a "
                 "UTF-8 text file or a folder of them, or leave it out for the embedded "
                 "corpus\n")


def test_the_embedded_corpus_is_python_own_text_and_stable():
  text = corpus.embedded_corpus()
  assert 500_000 < text.num_bytes < 5_000_000
  assert text.sources[0] == "pydoc_data.topics" and len(text.sources) > 40
  assert b"The \"assert\" statement" in text.data and b"Return" in text.data
  text.data.decode("utf-8")  # all of it is UTF-8
  corpus.embedded_corpus.cache_clear()
  again = corpus.embedded_corpus()
  assert again.sha256 == text.sha256 == hashlib.sha256(again.data).hexdigest()
  ds = data.load_dataset("text")  # no --data-dir: the embedded corpus
  assert ds.context == data.TEXT_CONTEXT and ds.corpus_bytes == text.num_bytes
  assert len(ds.x_train) + len(ds.x_test) == (text.num_bytes - 1) // data.TEXT_CONTEXT


def test_a_changed_corpus_is_named_when_resuming(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(TEXT)
  saved = data.fingerprint(data.text(str(path), context=8))
  path.write_bytes(TEXT.replace(b"wisdom", b"WISDOM"))
  change = data.data_change(saved, data.fingerprint(data.text(str(path), context=8)))
  assert change.startswith(f"text corpus of {len(TEXT)} bytes (sha256 ")
  assert "training split: x_train has other contents" in change or (
      "test split" in change)


# --- the sequence loss --------------------------------------------------------


def test_sequence_cross_entropy_is_the_mean_over_positions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (3, 5)).astype(np.int32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  reference = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0].mean(-1)
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, reference, rtol=1e-5)
  # per-example means of equal-length sequences: their mean is the per-token mean
  np.testing.assert_allclose(got.mean(), -np.take_along_axis(
      log_p, labels[..., None], -1).mean(), rtol=1e-5)
  hits = (logits.argmax(-1) == labels).mean(-1)
  np.testing.assert_allclose(losses.argmax_correct(jnp.asarray(logits), labels), hits)
  # [B, C] with [B] is as before
  flat = losses.cross_entropy(jnp.asarray(logits[:, 0]), jnp.asarray(labels[:, 0]))
  np.testing.assert_allclose(flat, -np.take_along_axis(
      log_p[:, 0], labels[:, :1], -1)[:, 0], rtol=1e-5)
  assert losses.argmax_correct(jnp.asarray(logits[:, 0]), labels[:, 0]).dtype == jnp.bool_


# --- generate -----------------------------------------------------------------


def _bigram() -> meshnet.Model:
  """A legitimate causal model: each position's logits from its own byte."""
  def init(key):
    k1, k2 = jax.random.split(key)
    return {"embed": jax.random.normal(k1, (256, 16)) * 0.5,
            "out": jax.random.normal(k2, (16, 256)) * 0.5, "bias": jnp.zeros(256)}

  def apply(params, x_BxT):
    return params["embed"][x_BxT] @ params["out"] + params["bias"][None, None]  # [B, T, 256]

  return meshnet.Model(init, apply)


def _first_plus_one() -> meshnet.Model:
  """Causal: every position predicts (the window's first byte + 1) for sure."""
  return meshnet.Model(lambda key: {"scale": jnp.ones(())},
                       lambda p, x: 50.0 * p["scale"] * jax.nn.one_hot(
                           (x[:, :1] + 1) % 256, 256) * jnp.ones((1, x.shape[1], 256)))


def test_generate_greedy_is_the_argmax_chain():
  model = _bigram()
  params = model.init(jax.random.key(1))
  out = generate(model, params, [72, 105], 12, temperature=0, context=8)
  assert out.shape == (12,) and out.dtype == jnp.int32
  table = np.asarray(params["embed"] @ params["out"] + params["bias"][None])  # next-byte logits
  expected, last = [], 105
  for _ in range(12):
    last = int(table[last].argmax())
    expected.append(last)
  assert out.tolist() == expected
  again = generate(model, params, [72, 105], 12, temperature=0, context=8)
  assert again.tolist() == expected
  top1 = generate(model, params, [72, 105], 12, temperature=1.0, top_k=1,
                  key=jax.random.key(9), context=8)
  assert top1.tolist() == expected  # top-k 1 is greedy whatever the key


def test_generate_crops_the_window_to_the_context():
  out = generate(_first_plus_one(), {"scale": jnp.ones(())}, [10], 8, temperature=0,
                 context=4)
  # texts of up to 4 bytes start with 10; then the window slides one byte a token
  assert out.tolist() == [11, 11, 11, 11, 12, 12, 12, 12]
  long_prompt = generate(_first_plus_one(), {"scale": jnp.ones(())}, [1, 2, 3, 4, 5, 6],
                         1, temperature=0, context=4)
  assert long_prompt.tolist() == [4]  # only the prompt's last 4 bytes are read: 3 + 1


def test_generate_with_a_seed_reproduces():
  model = _bigram()
  params = model.init(jax.random.key(1))
  draw = lambda seed, **kw: generate(model, params, [65], 40, temperature=1.0,
                                     key=jax.random.key(seed), context=8, **kw).tolist()
  assert draw(3) == draw(3)
  assert draw(3) != draw(4)
  table = np.asarray(params["embed"] @ params["out"] + params["bias"][None])
  top3 = {c: set(np.argsort(table[c])[-3:]) for c in range(256)}
  tokens = [65, *draw(5, top_k=3)]
  assert all(b in top3[a] for a, b in zip(tokens, tokens[1:]))  # only the 3 most likely


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "tokens=0 must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature=-0.5 must be a finite number >= 0"),
    (dict(top_k=0), "top_k=0 must be an integer >= 1"),
    (dict(prompt=[]), "prompt_tokens must be a non-empty 1-D array of token ids"),
    (dict(key=None, temperature=1.0), "sampling (temperature > 0) needs key="),
])
def test_generate_refuses_bad_options(kwargs, message):
  model = _bigram()
  options = dict(n=4, temperature=0.0, top_k=None, key=jax.random.key(0), context=8)
  prompt = kwargs.pop("prompt", [65])
  options.update(kwargs)
  n = options.pop("n")
  with pytest.raises(MeshnetError, match="^" + message.replace("(", r"\(").replace(
      ")", r"\)")):
    generate(model, model.init(jax.random.key(0)), prompt, n, **options)


# --- training and sampling -----------------------------------------------------


def test_a_custom_model_trains_on_text_and_samples_from_its_checkpoint(tmp_path):
  """Python: train.run on the embedded corpus with a model of one's own;
  the eval records carry bits per byte; sample_checkpoint takes the model."""
  model = _bigram()
  metrics = tmp_path / "m.jsonl"
  config = Config(
      data=DataConfig(dataset="text", batch_size=32),
      optim=OptimConfig(lr=0.02),
      train=TrainConfig(steps=40, eval_every=40, progress=False, metrics_file=str(metrics),
                        eval_batch_size=2048),
      checkpoint=CheckpointConfig(dir=str(tmp_path / "ck")), mesh=MeshConfig(devices=2))
  lines = []
  result = meshnet.train.run(config, model=model, log=lines.append)
  assert any(line.startswith("text corpus: embedded corpus (pydoc_data.topics") for line in lines)
  evals = [json.loads(line) for line in metrics.read_text().splitlines()
           if "eval_loss" in line]
  assert evals and math.isclose(evals[-1]["eval_bits_per_byte"],
                                evals[-1]["eval_loss"] / math.log(2), rel_tol=1e-9)
  shown = (f"eval @ step 40: loss {evals[-1]['eval_loss']:.4f}, "
           f"{evals[-1]['eval_bits_per_byte']:.4f} bits/byte, accuracy ")
  assert any(line.startswith(shown) for line in lines), lines
  # a byte-pair model already beats the corpus's byte frequencies
  unigram = _unigram_entropy(corpus.embedded_corpus().data)
  assert result.eval["eval_loss"] < unigram - 0.2, (result.eval, unigram)

  sample = sample_checkpoint(str(tmp_path / "ck"), "The ", 20, temperature=0.0, model=model)
  assert sample.step == 40 and sample.prompt == b"The " and len(sample.continuation) == 20
  _, params, context, _ = load_text_model(str(tmp_path / "ck"), model=model)
  assert context == data.TEXT_CONTEXT
  greedy = generate(model, params, list(b"The "), 20, temperature=0, context=context)
  assert bytes(np.asarray(greedy, np.uint8)) == sample.continuation
  # the command rebuilds the model from the config: not this custom one
  proc = _meshnet("sample", str(tmp_path / "ck"), "--prompt", "The ", "--tokens", "5")
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert "holds other parameters than model 'mlp' that its config names" in proc.stderr


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory):
  """``meshnet train --model gpt --dataset text``: the tiny GPT, 80 steps on
  the embedded corpus, on 2 simulated devices."""
  root = tmp_path_factory.mktemp("gpt")
  proc = _meshnet("train", "--model", "gpt", "--dataset", "text", "--devices", "2",
                  "--steps", "80", "--batch-size", "32", "--lr", "3e-3", "--eval-every",
                  "80", "--eval-batch-size", "1024", "--no-progress", "--checkpoint-dir",
                  str(root / "ck"), "--metrics-file", str(root / "m.jsonl"), timeout=600)
  assert proc.returncode == 0, proc.stderr
  return root, proc.stderr


def test_gpt_trains_on_the_embedded_corpus_below_its_unigram_entropy(gpt_checkpoint):
  root, log = gpt_checkpoint
  assert "windows of 64 bytes" in log  # gpt tiny's context sets the windows
  record = [json.loads(line) for line in (root / "m.jsonl").read_text().splitlines()
            if "eval_loss" in line][-1]
  assert f"eval @ step 80: loss {record['eval_loss']:.4f}, " \
         f"{record['eval_bits_per_byte']:.4f} bits/byte" in log
  unigram = _unigram_entropy(corpus.embedded_corpus().data)  # 3.29 nats on CPython 3.11
  assert record["eval_loss"] < unigram - 0.2, (record, unigram)


def test_meshnet_sample_prints_the_prompt_and_a_continuation(gpt_checkpoint):
  root, _ = gpt_checkpoint
  ck = str(root / "ck")
  greedy = _meshnet("sample", ck, "--prompt", "The ", "--tokens", "20", "--temperature", "0")
  assert greedy.returncode == 0, greedy.stderr
  expected = sample_checkpoint(ck, "The ", 20, temperature=0)
  assert len(expected.continuation) == 20 and expected.step == 80
  assert greedy.stdout == expected.text + "\n" and greedy.stdout.startswith("The ")
  drawn = [_meshnet("sample", ck, "--prompt", "def ", "--tokens", "30", "--top-k", "5",
                    "--seed", str(seed)).stdout for seed in (1, 1, 2)]
  assert drawn[0] == drawn[1] != drawn[2]
  assert drawn[0] == sample_checkpoint(ck, "def ", 30, top_k=5, seed=1).text + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "tokens=0 must be an integer >= 1"),
    (["--temperature", "-1"], "temperature=-1.0 must be a finite number >= 0"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_meshnet_sample_refuses_bad_options_in_one_line(gpt_checkpoint, argv, message,
                                                        capsys):
  root, _ = gpt_checkpoint
  assert cli.main(["sample", str(root / "ck"), *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"meshnet: error: {message}") and err.count("\n") == 1


def test_meshnet_sample_refuses_what_is_not_a_text_checkpoint(tmp_path, capsys):
  assert cli.main(["sample", str(tmp_path / "none")]) == 2
  assert capsys.readouterr().err == f"meshnet: error: {tmp_path}/none is not a directory\n"
  config = Config(data=DataConfig(dataset="xor"),
                  train=TrainConfig(steps=2, progress=False, eval_every=0),
                  checkpoint=CheckpointConfig(dir=str(tmp_path / "xor")))
  meshnet.train.run(config, log=lambda _: None)
  assert cli.main(["sample", str(tmp_path / "xor"), "--prompt", "hi"]) == 2
  assert capsys.readouterr().err == (
      f"meshnet: error: checkpoint {tmp_path}/xor (step 2) was trained on dataset 'xor', "
      "not text: meshnet sample needs a byte-level language model (meshnet train "
      "--dataset text)\n")
