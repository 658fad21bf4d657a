"""bench/zoo_report.py on one tiny model: the report shows what it computed."""

import copy
import json
import os
import sys

import numpy as np

from dropvar_tf._keras import tf

sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import zoo_report  # noqa: E402  (a script, not a package)

_TINY = zoo_report.Kind(
    "tiny digits MLP", lambda: zoo_report.softmax_mlp("tiny"),
    zoo_report.digits_data(zoo_report.as_flat), epochs=1,
    num_calibration=96, num_samples=8, num_test=40)


def _row_line(text, model, head):
  lines = [l for l in text.splitlines()
           if l.startswith(f"| {model} | {head} |")]
  if len(lines) != 1:
    raise AssertionError(f"expected one row of {model} [{head}]: {lines}")
  return [c.strip() for c in lines[0].strip("|").split("|")]


class ZooReportTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    epochs, zoo_report.HEAD_EPOCHS = zoo_report.HEAD_EPOCHS, 5  # seconds
    try:
      cls.rows = zoo_report.run_kind("tiny", _TINY, quick=True, levers=False,
                                     log=lambda *a: None,
                                     reference_samples=20)
    finally:
      zoo_report.HEAD_EPOCHS = epochs

  def test_run_scores_the_head_against_the_reference(self):
    self.assertLen(self.rows, 1)
    row = self.rows[0]
    self.assertEqual(row["head"], "default")
    self.assertEqual(row["num_test"], 40)
    self.assertEqual((row["num_samples"], row["reference_samples"]), (8, 20))
    for scores in (row["head_scores"], row["bound_scores"],
                   row["baselines"]["prediction_head"],
                   row["baselines"]["moment_propagation"]):
      self.assertTrue(np.isfinite(scores["spearman"]), msg=scores)
      self.assertTrue(np.isfinite(scores["r2"]), msg=scores)
    self.assertAllClose(
        row["gap"], row["bound_scores"]["spearman"] -
        row["head_scores"]["spearman"])
    self.assertEqual(row["goal_met"], row["gap"] <= zoo_report.GOAL_GAP)
    self.assertGreater(row["cost"]["ratio_fastest"], 0.0)

  def test_tables_show_the_computed_numbers(self):
    out = self.get_temp_dir()
    md, js = zoo_report.write_report(self.rows, out, "cmd --x", 60.0)
    with open(md) as f:
      text = f.read()
    row = self.rows[0]
    cells = _row_line(text, "tiny", "default")
    self.assertEqual(cells[4], f"{row['head_scores']['spearman']:.3f}")
    self.assertEqual(cells[5], f"{row['head_scores']['r2']:.3f}")
    self.assertEqual(cells[6], f"{row['bound_scores']['spearman']:.3f}")
    self.assertEqual(cells[8], f"{row['gap']:+.3f}")
    self.assertEqual(cells[9], "met" if row["goal_met"] else "MISSED")
    self.assertIn("`cmd --x`", text)
    with open(js) as f:
      stored = json.load(f)
    self.assertEqual(stored["rows"][0]["head_scores"], row["head_scores"])

  def test_goal_follows_the_scores(self):
    out = self.get_temp_dir()
    row = copy.deepcopy(self.rows[0])
    row["bound_scores"]["spearman"] = 0.9
    texts = {}
    for head in (0.88, 0.85):
      row["head_scores"]["spearman"] = head
      zoo_report.write_report([row], out, "cmd", 1.0)
      with open(os.path.join(out, "zoo.md")) as f:
        texts[head] = _row_line(f.read(), "tiny", "default")
    self.assertEqual(texts[0.88][4:10:4], ["0.880", "+0.020"])
    self.assertEqual(texts[0.88][9], "met")
    self.assertEqual(texts[0.85][4:10:4], ["0.850", "+0.050"])
    self.assertEqual(texts[0.85][9], "MISSED")

  def test_notes_below_the_marker_are_kept(self):
    out = self.get_temp_dir()
    zoo_report.write_report(self.rows, out, "cmd", 1.0, notes="## Hand notes")
    zoo_report.write_report(self.rows, out, "cmd", 2.0)
    with open(os.path.join(out, "zoo.md")) as f:
      text = f.read()
    self.assertIn("<!-- notes -->\n\n## Hand notes", text)

  def test_unknown_model_is_refused(self):
    with self.assertRaises(SystemExit):
      zoo_report.main(["--models=resnet"])


if __name__ == "__main__":
  tf.test.main()
