"""Tests for dropvar_tf.study.runner: one study run in its small mode."""

import glob
import json
import math
import os
import tempfile

import numpy as np

from dropvar_tf import metrics
from dropvar_tf._keras import tf
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import estimators
from dropvar_tf.study import runner

_RATE = config_lib.TARGET_RATE


class StudySmallRunTest(tf.test.TestCase):
  """One small study run (digits + Criteo-like), shared by the tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.cache = os.path.join(cls.tmp.name, "cache")
    cls.out = os.path.join(cls.tmp.name, "report")
    cls.config = config_lib.small_config(cache_dir=cls.cache)
    cls.logged = []
    cls.results = runner.run_study(cls.config, cls.out,
                                   log=cls.logged.append)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_report_files_exist(self):
    names = sorted(os.listdir(self.out))
    self.assertEqual(names, sorted([
        "results.md", "results.json", "fidelity_by_layers.png",
        "fidelity_by_rate.png", "cost_fidelity.png", "scatter_digits.png",
        "scatter_criteo.png"]))
    for name in names:
      self.assertGreater(os.path.getsize(os.path.join(self.out, name)), 500)

  def test_rows_per_task(self):
    for task in self.config.tasks:
      names = [r["estimator"] for r in self.results["rows"]
               if r["task"] == task]
      self.assertEqual(names[:5], [
          estimators.RECOMMENDED, estimators.ALL_LAYERS, "head: hidden_0",
          "head: hidden_1", "head: last layer (hidden_1)"])
      self.assertIn(estimators.SUMMARY, names)
      self.assertIn(estimators.PREDICTION_HEAD, names)
      self.assertIn(estimators.INPUT_ONLY, names)
      self.assertIn(estimators.MOMENT_PROPAGATION, names)
      self.assertEqual(names[-1], estimators.NOISE_CEILING)
      self.assertTrue(any(n.startswith(estimators.PREDICTION_CLOSED_FORM)
                          for n in names))

  def _reference_targets(self, task):
    paths = glob.glob(os.path.join(self.cache,
                                   f"{task}_r{_RATE}_*_reference.npy"))
    self.assertLen(paths, 1)
    return np.load(paths[0])

  def test_rows_scored_against_test_and_reference_targets(self):
    # Recomputed from the stored estimates: a row scored against the wrong
    # targets (the noise-ceiling run, another task's) fails here.
    scored = [r for r in self.results["rows"] if "spearman" in r]
    self.assertGreaterEqual(len(scored), 2 * 10)
    for info in self.results["configs"]:
      task = info["task"]
      ref = self._reference_targets(task)
      for r in (r for r in scored if r["task"] == task):
        expected = metrics.fidelity(np.asarray(r["estimate"]),
                                    np.asarray(info["test_targets"]))
        expected_ref = metrics.fidelity(np.asarray(r["estimate"]), ref)
        for key in ("spearman", "pearson", "r2", "auc_top10",
                    "auc_bottom10"):
          self.assertTrue(math.isfinite(r[key]), (r["estimator"], key))
          self.assertTrue(math.isfinite(r["ref_" + key]),
                          (r["estimator"], key))
          self.assertAllClose(r[key], expected[key],
                              msg=f"{r['estimator']}/{key}")
          self.assertAllClose(r["ref_" + key], expected_ref[key],
                              msg=f"{r['estimator']}/ref_{key}")
        self.assertEqual(r["n"], 200)
        if r["group"] == estimators.HEAD:
          self.assertGreater(r["head_params"], 0)
          self.assertGreater(r["us_per_example"], 0.0)

  def test_every_row_names_its_data(self):
    for r in self.results["rows"]:
      expected = {"digits": "digits (real)",
                  "criteo": "Criteo-like (synthetic)"}[r["task"]]
      self.assertTrue(r["data"].startswith(expected), r["data"])
      self.assertIn("600 train / 200 test", r["data"])
      self.assertEqual(r["rate"], _RATE)

  def test_markdown_tables(self):
    with open(os.path.join(self.out, "results.md")) as f:
      text = f.read()
    self.assertIn("## Targets (dropout rate 0.3)", text)
    table_lines = [l for l in text.splitlines()
                   if l.startswith("| " + estimators.RECOMMENDED)]
    self.assertLen(table_lines, 2)
    for line in table_lines:
      cells = [c.strip() for c in line.strip("|").split("|")]
      # estimator, data, rate, 6 metrics, 2 T=20 reference metrics, cost.
      self.assertLen(cells, 13)
      for cell in cells[3:11]:
        self.assertBetween(float(cell), -1e6, 1.0)
    self.assertIn("| Criteo-like (synthetic), 600 train / 200 test |", text)
    self.assertIn("![scatter digits](scatter_digits.png)", text)

  def test_json_matches_rows(self):
    with open(os.path.join(self.out, "results.json")) as f:
      stored = json.load(f)
    self.assertLen(stored["rows"], len(self.results["rows"]))
    self.assertNotIn("estimate", stored["rows"][0])
    self.assertEqual(stored["config"]["num_samples"], 10)

  def test_checks_cover_targets(self):
    checks = self.results["checks"]
    for task in self.config.tasks:
      names = [c["check"] for c in checks if c["task"] == task]
      self.assertIn("recommended head Spearman", names)
      self.assertIn("recommended head R2", names)
      self.assertTrue(any(n.startswith("all layers minus best single")
                          for n in names))
    self.assertEqual({c["against"] for c in checks}, {"mc", "ref"})
    for c in checks:
      self.assertIn(c["passed"], (True, False, None))

  def test_rerun_reuses_cache(self):
    logged = []
    again = runner.run_study(self.config,
                             os.path.join(self.tmp.name, "again"),
                             log=logged.append)
    self.assertLen(logged, len(self.config.tasks))
    self.assertTrue(all("reused" in line for line in logged))
    self.assertEqual(
        [r["spearman"] for r in again["rows"] if "spearman" in r],
        [r["spearman"] for r in self.results["rows"] if "spearman" in r])


if __name__ == "__main__":
  tf.test.main()
