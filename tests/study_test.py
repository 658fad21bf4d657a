"""Tests for the fidelity study (`dropvar_tf.study`) in its small mode."""

import dataclasses
import json
import math
import os
import tempfile

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study import study
from dropvar_tf.study import cli as study_cli

_RATE = study.TARGET_RATE


class StudySmallRunTest(tf.test.TestCase):
  """One small study run (digits + Criteo-like), shared by the tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.cache = os.path.join(cls.tmp.name, "cache")
    cls.out = os.path.join(cls.tmp.name, "report")
    cls.config = study.small_config(cache_dir=cls.cache)
    cls.logged = []
    cls.results = study.run_study(cls.config, cls.out,
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
          study.RECOMMENDED, study.ALL_LAYERS, "head: hidden_0",
          "head: hidden_1", "head: last layer (hidden_1)"])
      self.assertIn(study.SUMMARY, names)
      self.assertIn(study.PREDICTION_HEAD, names)
      self.assertIn(study.INPUT_ONLY, names)
      self.assertIn(study.MOMENT_PROPAGATION, names)
      self.assertEqual(names[-1], study.NOISE_CEILING)
      self.assertTrue(any(n.startswith(study.PREDICTION_CLOSED_FORM)
                          for n in names))

  def test_numbers_finite_and_in_range(self):
    scored = [r for r in self.results["rows"] if "spearman" in r]
    self.assertGreaterEqual(len(scored), 2 * 10)
    for r in scored:
      for key in ("spearman", "pearson", "auc_top10", "auc_bottom10"):
        self.assertTrue(math.isfinite(r[key]), (r["estimator"], key))
        self.assertBetween(r[key], -1.0, 1.0)
      for key in ("r2", "ref_r2"):
        self.assertTrue(math.isfinite(r[key]))
        self.assertLessEqual(r[key], 1.0)
      self.assertBetween(r["ref_spearman"], -1.0, 1.0)
      self.assertEqual(r["n"], 200)
      if r["group"] == study.HEAD:
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
                   if l.startswith("| " + study.RECOMMENDED)]
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
    again = study.run_study(self.config, os.path.join(self.tmp.name, "again"),
                            log=logged.append)
    self.assertLen(logged, len(self.config.tasks))
    self.assertTrue(all("reused" in line for line in logged))
    self.assertEqual(
        [r["spearman"] for r in again["rows"] if "spearman" in r],
        [r["spearman"] for r in self.results["rows"] if "spearman" in r])


class TargetChecksTest(tf.test.TestCase):

  def _rows(self, rec, all_layers, single, pred, mp):
    def row(name, s, r2, group=study.HEAD, layers=None):
      return {"task": "digits", "rate": _RATE, "estimator": name,
              "group": group, "spearman": s, "r2": r2, "layers": layers,
              "features": "neurons", "include_prediction": False}
    return [row(study.RECOMMENDED, *rec, layers=["a", "b"]),
            row(study.ALL_LAYERS, *all_layers, layers=["a", "b"]),
            row("head: a", *single, layers=["a"]),
            row(study.PREDICTION_HEAD, *pred, group=study.BASELINE),
            row(study.MOMENT_PROPAGATION, *mp, group=study.BASELINE)]

  def test_all_pass(self):
    checks = study.target_checks(self._rows(
        (0.95, 0.8), (0.94, 0.7), (0.93, 0.7), (0.9, 0.5), (0.9, 0.6)))
    self.assertLen(checks, 5)
    self.assertTrue(all(c["passed"] for c in checks))

  def test_misses(self):
    checks = study.target_checks(self._rows(
        (0.92, 0.7), (0.94, 0.7), (0.90, 0.7), (0.93, 0.5), (0.9, 0.75)))
    self.assertEqual([c["passed"] for c in checks],
                     [False, False, False, False, False])
    gap = checks[2]
    self.assertAllClose(gap["value"], 0.04)

  def test_noise_ceiling_gives_the_attainable_bound(self):
    rows = self._rows((0.95, 0.8), (0.94, 0.7), (0.93, 0.7), (0.9, 0.5),
                      (0.9, 0.6))
    rows.append({"task": "digits", "rate": _RATE,
                 "estimator": study.NOISE_CEILING, "group": study.CEILING,
                 "spearman": 0.81, "pearson": 0.85, "r2": 0.7})
    checks = study.target_checks(rows)
    self.assertLen(checks, 6)
    bound = checks[2]
    self.assertIn("bound for any estimator", bound["check"])
    self.assertAllClose(bound["value"], (0.9, 0.85))
    self.assertIsNone(bound["passed"])
    # Against the less noisy reference run the bound does not apply.
    ref_rows = [dict(r, ref_spearman=r["spearman"], ref_r2=r["r2"])
                for r in rows]
    ref_checks = study.target_checks(ref_rows, against="ref")
    self.assertLen(ref_checks, 5)
    self.assertFalse(any("bound" in c["check"] for c in ref_checks))

  def test_unsupported_baseline_is_not_applicable(self):
    rows = self._rows((0.95, 0.8), (0.94, 0.7), (0.93, 0.7), (0.9, 0.5),
                      (0.9, 0.6))
    rows[-1] = {"task": "digits", "rate": _RATE,
                "estimator": study.MOMENT_PROPAGATION,
                "group": study.BASELINE, "unsupported": "layer x"}
    self.assertIsNone(study.target_checks(rows)[-1]["passed"])


class ConfigTest(tf.test.TestCase):

  def test_unknown_task(self):
    config = dataclasses.replace(study.small_config(), tasks=("emnist",))
    with self.assertRaisesRegex(ValueError, "argument `tasks`.*emnist"):
      study.check_config(config)

  def test_bad_rate(self):
    config = dataclasses.replace(study.small_config(), dropout_rates=(1.5,))
    with self.assertRaisesRegex(ValueError, "argument `dropout_rates`"):
      study.check_config(config)

  def test_not_a_config(self):
    with self.assertRaisesRegex(ValueError, "argument `config`"):
      study.check_config({"tasks": ("digits",)})

  def test_cli_config(self):
    config = study_cli.make_config(small=True, tasks=["digits"],
                                   rates=["0.1", "0.5"], num_samples=4)
    self.assertEqual(config.tasks, ("digits",))
    self.assertEqual(config.dropout_rates, (0.1, 0.5))
    self.assertEqual(config.num_samples, 4)
    self.assertEqual(config.label, "small")
    with self.assertRaisesRegex(ValueError, "argument `rates`"):
      study_cli.make_config(rates=["x"])

  def test_cap_is_seeded_subset(self):
    config = dataclasses.replace(study.small_config(), max_train=50,
                                 max_test=20)
    a, short, full = study.load_task(study.DIGITS, config)
    b, _, _ = study.load_task(study.DIGITS, config)
    self.assertEqual(a.x_train.shape, (50, 64))
    self.assertEqual(a.x_test.shape, (20, 64))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    self.assertEqual(short, "digits (real), 50 train / 20 test")
    self.assertIn("load_digits", full)


if __name__ == "__main__":
  tf.test.main()
