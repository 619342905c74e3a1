"""meshnet plot: loss and accuracy curves from metrics files, as a PNG."""

import json

import matplotlib.image
import numpy as np
import pytest

from meshnet import cli
from meshnet.errors import MeshnetError
from meshnet.metrics import MetricsWriter
from meshnet.plot import plot_metrics, read_curves

TRAIN_BLUE = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's C0: the first run
SECOND_ORANGE = np.array([0xFF, 0x7F, 0x0E]) / 255  # C1: the second run


def _write(path, train, evals=()):
  """A metrics file as ``meshnet train`` writes it: ``train`` is
  ``[(step, loss)]``, ``evals`` ``[(step, eval_loss, eval_accuracy)]``."""
  with MetricsWriter(str(path)) as writer:
    evals = list(evals)
    for step, loss in train:
      writer.write({"step": step, "epoch": 0, "loss": loss, "grad_norm": 1.0, "lr": 1e-3,
                    "samples_per_sec": 1000.0})
      while evals and evals[0][0] == step:
        s, eval_loss, accuracy = evals.pop(0)
        writer.write({"step": s, "eval_loss": eval_loss, "eval_accuracy": accuracy})
  return str(path)


def _pixels_like(picture, colour, tolerance=0.02) -> int:
  return int((np.abs(picture[..., :3] - colour) < tolerance).all(-1).sum())


def test_the_png_shows_the_curves_of_the_files(tmp_path):
  a = _write(tmp_path / "adam.jsonl", [(s, 2.0 / s) for s in range(10, 110, 10)],
             [(50, 0.5, 0.8), (100, 0.3, 0.9)])
  b = _write(tmp_path / "sgd.jsonl", [(s, 3.0 - s / 100) for s in range(10, 110, 10)],
             [(100, 2.1, 0.4)])
  out = tmp_path / "plots" / "loss.png"
  curves = plot_metrics([a, b], str(out))

  assert [c.label for c in curves] == ["adam", "sgd"]
  steps, values = curves[0].train_loss
  np.testing.assert_array_equal(steps, np.arange(10, 110, 10))
  np.testing.assert_allclose(values, 2.0 / steps)
  np.testing.assert_array_equal(curves[0].eval_loss[0], [50, 100])
  np.testing.assert_allclose(curves[0].eval_accuracy[1], [0.8, 0.9])
  np.testing.assert_allclose(curves[1].eval_loss[1], [2.1])

  picture = matplotlib.image.imread(str(out))
  assert picture.shape[:2] == (400, 1100)  # two panels: loss and accuracy
  assert picture[..., :3].std() > 0.05  # not blank
  assert _pixels_like(picture, TRAIN_BLUE) > 300  # both runs' lines are drawn
  assert _pixels_like(picture, SECOND_ORANGE) > 300


def test_different_files_draw_different_pictures(tmp_path):
  a = _write(tmp_path / "a.jsonl", [(s, 1.0 / s) for s in range(1, 21)])
  b = _write(tmp_path / "b.jsonl", [(s, 1.0 + np.sin(s)) for s in range(1, 21)])
  plot_metrics([a], str(tmp_path / "a.png"))
  plot_metrics([b], str(tmp_path / "b.png"))
  plot_metrics([a], str(tmp_path / "a2.png"))
  pa, pb, pa2 = (matplotlib.image.imread(str(tmp_path / n)) for n in ("a.png", "b.png",
                                                                     "a2.png"))
  assert pa.shape == pb.shape == (400, 550, 4)  # no accuracy: the loss panel only
  assert np.abs(pa - pb).max() > 0.5
  np.testing.assert_array_equal(pa, pa2)


def test_a_resumed_runs_file_keeps_the_later_records(tmp_path):
  path = _write(tmp_path / "run.jsonl", [(5, 1.0), (10, 0.9), (15, 0.8), (20, 0.7)],
                [(10, 0.95, 0.5), (15, 0.85, 0.55), (20, 0.75, 0.6)])
  # Appended by a run resumed from step 10 (as an older meshnet did, without
  # dropping the stopped run's later lines).
  with open(path, "a") as f:
    for step, loss in [(15, 0.5), (20, 0.4), (25, 0.3)]:
      f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    f.write(json.dumps({"step": 20, "eval_loss": 0.45, "eval_accuracy": 0.7}) + "\n")
  curves = read_curves(path)
  np.testing.assert_array_equal(curves.train_loss[0], [5, 10, 15, 20, 25])
  np.testing.assert_allclose(curves.train_loss[1], [1.0, 0.9, 0.5, 0.4, 0.3])
  # The stopped run's evaluations after step 10 went with its training records.
  np.testing.assert_array_equal(curves.eval_loss[0], [10, 20])
  np.testing.assert_allclose(curves.eval_accuracy[1], [0.5, 0.7])


def test_a_last_line_cut_short_is_skipped(tmp_path):
  path = _write(tmp_path / "live.jsonl", [(1, 1.0), (2, 0.5)])
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')  # the writer is in the middle of this line
  np.testing.assert_array_equal(read_curves(path).train_loss[0], [1, 2])


def test_labels_and_duplicate_names(tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "y").mkdir()
  a = _write(tmp_path / "x" / "metrics.jsonl", [(1, 1.0), (2, 0.5)])
  b = _write(tmp_path / "y" / "metrics.jsonl", [(1, 2.0), (2, 1.0)])
  out = str(tmp_path / "p.png")
  assert [c.label for c in plot_metrics([a, b], out)] == ["x/metrics", "y/metrics"]
  assert [c.label for c in plot_metrics([a, b], out, labels=["adam", "sgd"])] == [
      "adam", "sgd"]
  with pytest.raises(MeshnetError, match="1 labels .* for 2 metrics files"):
    plot_metrics([a, b], out, labels=["adam"])


@pytest.mark.parametrize("content, message", [
    ("", "holds no records"),
    ("\n\n", "holds no records"),
    ('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 0.5}\n', "line 2 is not JSON"),
    ('{"step": 1, "loss": 1.0}\n[1, 2]\n', "line 2 is not a metrics record"),
    ('{"step": "one", "loss": 1.0}\n', "line 1 is not a metrics record"),
    ('{"step": 1, "lr": 0.1}\n', "holds no loss records"),
])
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, capsys, content,
                                                             message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(MeshnetError, match=message) as error:
    read_curves(str(path))
  assert str(path) in str(error.value) and "\n" not in str(error.value)
  assert cli.main(["plot", str(path), "-o", str(tmp_path / "p.png")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("meshnet: error: ") and message in err and err.count("\n") == 1
  assert not (tmp_path / "p.png").exists()


def test_missing_files_and_bad_outputs(tmp_path, capsys):
  good = _write(tmp_path / "m.jsonl", [(1, 1.0)])
  assert cli.main(["plot", good, str(tmp_path / "nope.jsonl"), "-o",
                   str(tmp_path / "p.png")]) == 2
  err = capsys.readouterr().err
  assert f"metrics file {tmp_path / 'nope.jsonl'} not found" in err and err.count("\n") == 1
  with pytest.raises(MeshnetError, match="is a directory"):
    plot_metrics([good], str(tmp_path))
  with pytest.raises(MeshnetError, match="is a file"):
    plot_metrics([good], str(tmp_path / "m.jsonl" / "p.png"))
  with pytest.raises(MeshnetError, match="no metrics files"):
    plot_metrics([], str(tmp_path / "p.png"))


def test_meshnet_plot_command(tmp_path, capsys):
  a = _write(tmp_path / "a.jsonl", [(s, 1.0 / s) for s in range(1, 11)], [(10, 0.2, 0.9)])
  b = _write(tmp_path / "b.jsonl", [(s, 2.0 / s) for s in range(1, 11)])
  out = tmp_path / "loss.png"
  assert cli.main(["plot", a, b, "-o", str(out), "--labels", "fast,slow",
                   "--title", "digits"]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  picture = matplotlib.image.imread(str(out))
  assert picture.shape[:2] == (400, 1100) and picture[..., :3].std() > 0.05


def test_output_without_extension_is_a_png_under_exactly_that_name(tmp_path, capsys):
  metrics = _write(tmp_path / "m.jsonl", [(s, 1.0 / s) for s in range(1, 6)])
  out = tmp_path / "loss"
  assert cli.main(["plot", metrics, "-o", str(out)]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (tmp_path / "loss.png").exists()


def test_a_run_with_one_record_shows_its_point(tmp_path):
  """One training record draws no line segment; it gets a marker."""
  out = tmp_path / "one.png"
  plot_metrics([_write(tmp_path / "one.jsonl", [(5, 1.5)])], str(out))
  # The legend's short line alone is about 50 such pixels; with the marker
  # (in the plot and in the legend) about 150.
  assert _pixels_like(matplotlib.image.imread(str(out)), TRAIN_BLUE) > 100


def test_a_diverged_run_does_not_flatten_a_good_one(tmp_path):
  """Losses over many powers of ten: a log axis, so the good curve still falls
  over many pixel rows instead of lying flat at the bottom."""
  good = _write(tmp_path / "good.jsonl", [(s, 2.0 / s) for s in range(1, 21)])
  bad = _write(tmp_path / "bad.jsonl", [(s, 10.0 ** s) for s in range(1, 21)])
  out = tmp_path / "div.png"
  plot_metrics([good, bad], str(out))
  blue = (np.abs(matplotlib.image.imread(str(out))[..., :3] - TRAIN_BLUE) < 0.02).all(-1)
  assert len(set(np.nonzero(blue)[0])) > 12  # a flat line (and its legend): about 4 rows
