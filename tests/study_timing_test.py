"""Tests for dropvar_tf.study.timing (inference cost per example)."""

import math
import os
import sys

from dropvar_tf._keras import tf
from dropvar_tf.study import timing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm


class TimingTest(tf.test.TestCase):

  def test_seconds_per_example_are_positive(self):
    for kind in ("softmax", "recommender"):
      model = tm.build(kind)
      x = tm.sample_inputs(kind, 16)
      one = timing.one_pass_seconds(model, x, repeats=2)
      mc = timing.mc_seconds(model, x, num_samples=3, repeats=1)
      for seconds in (one, mc):
        self.assertTrue(math.isfinite(seconds), kind)
        self.assertGreater(seconds, 0.0)


if __name__ == "__main__":
  tf.test.main()
