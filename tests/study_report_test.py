"""Tests for dropvar_tf.study.report (tables, plots, the study report)."""

import os
import tempfile

import numpy as np

from dropvar_tf import metrics
from dropvar_tf.study import report
from dropvar_tf._keras import tf

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER = ("| estimator | spearman | pearson | r2 | r2_log | auc_top10 | "
           "auc_bottom10 |")
_SEPARATOR = "|---|---:|---:|---:|---:|---:|---:|"


def _data(n=300, seed=0):
  rng = np.random.default_rng(seed)
  target = rng.gamma(2.0, 0.05, n)
  estimate = target * np.exp(rng.normal(0.0, 0.3, n))
  return estimate, target


class FidelityTableTest(tf.test.TestCase):

  def test_known_rows(self):
    rows = [
        ("head", {"spearman": 0.91234, "pearson": 0.8, "r2": -0.5,
                  "r2_log": 0.25, "auc_top10": 1.0, "auc_bottom10": 0.0}),
        ("constant", {"spearman": float("nan"), "pearson": float("nan"),
                      "r2": 0.0, "r2_log": 0.0, "auc_top10": 0.5}),
    ]
    self.assertEqual(report.fidelity_table(rows), "\n".join([
        _HEADER, _SEPARATOR,
        "| head | 0.912 | 0.800 | -0.500 | 0.250 | 1.000 | 0.000 |",
        # NaN and a missing key both read n/a.
        "| constant | n/a | n/a | 0.000 | 0.000 | 0.500 | n/a |",
    ]))

  def test_custom_columns_and_real_scores(self):
    estimate, target = _data()
    scores = metrics.fidelity(estimate, target)
    table = report.fidelity_table([("a", scores), ("b", scores)],
                                  columns=("spearman", "mae"))
    lines = table.split("\n")
    self.assertEqual(lines[0], "| estimator | spearman | mae |")
    self.assertEqual(lines[1], "|---|---:|---:|")
    self.assertEqual(lines[2], f"| a | {scores['spearman']:.3f} | "
                     f"{scores['mae']:.3f} |")
    self.assertEqual(len(lines), 4)

  def test_no_rows_gives_header_only(self):
    self.assertEqual(report.fidelity_table([]),
                     _HEADER + "\n" + _SEPARATOR)


class StudyTablesTest(tf.test.TestCase):

  def test_checks_table(self):
    checks = [
        {"task": "digits", "check": "recommended head Spearman",
         "against": "mc", "value": 0.9512, "goal": ">= 0.93",
         "passed": True},
        {"task": "digits", "check": "bound", "against": "mc",
         "value": (0.5, 0.25), "goal": "(bound, not a goal)", "passed": None},
        {"task": "criteo", "check": "recommended above x", "against": "ref",
         "value": None, "goal": "n/a", "passed": False},
    ]
    self.assertEqual(report.checks_table(checks).split("\n"), [
        "| task | check (test split) | scored against | measured | goal | "
        "result |",
        "|---|---|---:|---:|---:|---:|",
        "| digits | recommended head Spearman | mc | 0.951 | >= 0.93 | pass |",
        "| digits | bound | mc | 0.500 / 0.250 | (bound, not a goal) | n/a |",
        "| criteo | recommended above x | ref | n/a | n/a | MISS |",
    ])

  def test_fidelity_rows_table_with_reference_and_unsupported(self):
    scores = {"spearman": 0.5, "pearson": 0.25, "r2": -1.0, "r2_log": 0.0,
              "auc_top10": 1.0, "auc_bottom10": 0.75, "ref_spearman": 0.6,
              "ref_r2": float("nan")}
    rows = [
        dict(scores, estimator="head", data="d", rate=0.3, head_params=1234,
             us_per_example=5.04),
        {"estimator": "mp", "data": "d", "rate": 0.3, "head_params": None,
         "us_per_example": None, "unsupported": "layer x"},
    ]
    lines = report.fidelity_rows_table(rows, reference_samples=20).split("\n")
    self.assertEqual(lines[0], (
        "| estimator | data | rate | spearman | pearson | r2 | r2_log | "
        "auc_top10 | auc_bottom10 | spearman (T=20) | r2 (T=20) | "
        "head params | µs/example |"))
    self.assertEqual(lines[2], "| head | d | 0.3 | 0.500 | 0.250 | -1.000 | "
                     "0.000 | 1.000 | 0.750 | 0.600 | n/a | 1,234 | 5.0 |")
    self.assertEqual(lines[3], "| mp | d | 0.3 | unsupported: layer x | n/a "
                     "| n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")


class PlotTest(tf.test.TestCase):

  def _dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())

  def _assert_png(self, path):
    self.assertTrue(os.path.isfile(path), msg=path)
    self.assertGreater(os.path.getsize(path), 1000)
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), _PNG_SIGNATURE)

  def test_scatter_plot(self):
    estimate, target = _data()
    path = os.path.join(self._dir(), "scatter.png")
    self.assertEqual(report.scatter_plot(estimate, target, path), path)
    self._assert_png(path)

  def test_scatter_plot_with_zeros_and_new_folder(self):
    estimate, target = _data()
    estimate[:10] = 0.0
    target[5:15] = 0.0
    path = os.path.join(self._dir(), "a", "b", "scatter.png")
    report.scatter_plot(estimate, target, path, title="zeros")
    self._assert_png(path)

  def test_decile_plot(self):
    estimate, target = _data()
    path = os.path.join(self._dir(), "deciles.png")
    result = report.decile_plot(
        {"head": estimate, "noise": np.random.default_rng(1).random(300)},
        target, path, bins=5)
    self.assertEqual(result, path)
    self._assert_png(path)

  def test_plot_rejects_bad_values(self):
    estimate, target = _data()
    target[0] = np.nan
    with self.assertRaises(ValueError):
      report.scatter_plot(estimate, target,
                          os.path.join(self._dir(), "bad.png"))


if __name__ == "__main__":
  tf.test.main()
