"""Smoke test of bench/zoo_cost_bench.py (its --quick mode, one model)."""

import os
import sys

import numpy as np

from dropvar_tf import heads
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import zoo_cost_bench  # noqa: E402  (a script, not a package)


class ZooCostBenchTest(tf.test.TestCase):

  def test_quick_run_prints_the_table(self):
    table = zoo_cost_bench.main(["--quick", "--models=lstm",
                                 "--batch_sizes=4,8", "--repeats=1"])
    self.assertEqual(list(table), ["lstm"])
    self.assertEqual(sorted(table["lstm"]), [4, 8])
    for ratios in table["lstm"].values():
      for kind in ("auto", "all"):
        paired, best = ratios[kind]
        self.assertLen(paired, 1)
        self.assertTrue(np.all(np.isfinite(paired)), msg=kind)
        self.assertTrue(np.isfinite(best), msg=kind)

  def test_also_summary_times_summary_probes_too(self):
    table = zoo_cost_bench.main(["--quick", "--models=lstm",
                                 "--batch_sizes=4", "--repeats=1",
                                 "--also_summary"])
    self.assertCountEqual(table["lstm"][4], ["auto", "all", "summary"])
    paired, best = table["lstm"][4]["summary"]
    self.assertTrue(np.all(np.isfinite(paired)))
    self.assertTrue(np.isfinite(best))

  def test_unknown_model_is_refused(self):
    with self.assertRaises(SystemExit):
      zoo_cost_bench.main(["--quick", "--models=resnet"])

  def test_calibrate_batchnorm_sets_moving_stats_from_the_batch(self):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    norm = keras.layers.BatchNormalization(momentum=0.9, name="bn")
    h = keras.layers.Dropout(0.2)(norm(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    x = np.random.default_rng(0).normal(5.0, 2.0, (64, 3)).astype("float32")
    self.assertEqual(zoo_cost_bench.calibrate_batchnorm(model, x), 1)
    self.assertAllClose(norm.moving_mean, x.mean(axis=0), rtol=1e-5)
    self.assertAllClose(norm.moving_variance, x.var(axis=0), rtol=1e-4)
    self.assertEqual(norm.momentum, 0.9)

  def test_zoo_models_take_their_inputs_and_get_a_head(self):
    for name, size in [("encoder", 4), ("lstm", 4)]:
      with self.subTest(name=name):
        model, make_input = zoo_cost_bench.build(name, size)
        dual = heads.add_variation_head(model)
        out = dual(make_input(2, size, 0))
        self.assertEqual(tuple(out["variation"].shape), (2,))
        self.assertLessEqual(
            len(heads.variation_head_metadata(dual)["layers"]), 4)


if __name__ == "__main__":
  tf.test.main()
