"""Tests for dropvar_tf.study.demo (the `dropvar` job), with tiny settings."""

import json
import os
import shutil
import tempfile
from unittest import mock

from absl import app
from absl import flags
import numpy as np

from dropvar_tf import contract
from dropvar_tf.study import demo
from dropvar_tf.study.data import images
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

_ROWS = ("variation head (one pass)", "moment propagation (one pass)",
         "prediction only: 1 - max prob", "noise ceiling: 2nd MC run")
_FIDELITY_KEYS = {"pearson", "spearman", "kendall", "r2", "r2_log", "mae",
                  "auc_top10", "auc_bottom10", "n"}
# Digits: 1,797 rows, 30% held out.
_NUM_TEST = 539
_NUM_SAMPLES = 10


class RunTest(tf.test.TestCase):
  """One tiny run shared by the tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.output_dir = tempfile.mkdtemp(prefix="dropvar_demo_test_")
    cls.lines = []
    cls.results = demo.run(cls.output_dir, num_samples=_NUM_SAMPLES,
                          num_perturbed=300, base_epochs=3, head_epochs=3,
                          seed=0, export=True, log=cls.lines.append)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.output_dir, ignore_errors=True)
    super().tearDownClass()

  def test_results_keys(self):
    self.assertContainsSubset(
        {"accuracy", "fidelity", "paths", "timings", "head_metadata"},
        set(self.results))
    self.assertEqual(set(self.results["fidelity"]), set(_ROWS))
    for name, scores in self.results["fidelity"].items():
      self.assertEqual(set(scores), _FIDELITY_KEYS, msg=name)
      self.assertEqual(scores["n"], _NUM_TEST, msg=name)
    self.assertEqual(set(self.results["timings"]),
                     {"base_training_s", "mc_targets_s", "head_s"})

  def test_accuracy_is_the_saved_models_test_accuracy(self):
    split = images.load_digits(test_fraction=0.3, seed=0, flat=True)
    dual = keras.saving.load_model(self.results["paths"]["keras_model"])
    prob = dual.predict(split.x_test, verbose=0)[contract.PREDICTION_KEY]
    self.assertAllClose(self.results["accuracy"],
                        np.mean(prob.argmax(-1) == split.y_test))
    # Ten classes: chance is 0.1; even three epochs learn digits.
    self.assertGreater(self.results["accuracy"], 0.5)

  def test_head_metadata(self):
    meta = self.results["head_metadata"]
    self.assertEqual(meta["num_samples"], _NUM_SAMPLES)
    self.assertEqual(meta["seed"], 0)
    self.assertEqual(meta["statistic"], contract.STAT_PREDICTED_CLASS_STD)

  def test_plots_exist(self):
    for key in ("scatter", "deciles"):
      path = self.results["paths"][key]
      self.assertTrue(path.startswith(self.output_dir), msg=path)
      self.assertTrue(os.path.isfile(path), msg=path)
      self.assertGreater(os.path.getsize(path), 1000, msg=path)

  def test_export_dir(self):
    export = self.results["paths"]["export"]
    self.assertEqual(export,
                     os.path.join(self.output_dir, "export", "digits", "1"))
    self.assertTrue(os.path.isfile(os.path.join(export, "saved_model.pb")))
    self.assertTrue(os.path.isfile(os.path.join(
        export, "assets", contract.METADATA_FILENAME)))

  def test_results_json_parses_and_matches(self):
    path = self.results["paths"]["results"]
    self.assertEqual(path, os.path.join(self.output_dir, "results.json"))
    with open(path) as f:
      stored = json.load(f)
    self.assertAllClose(stored["accuracy"], self.results["accuracy"])
    for name in _ROWS:
      for key, value in self.results["fidelity"][name].items():
        self.assertAllClose(stored["fidelity"][name][key], value,
                            msg=f"{name}/{key}")
    self.assertEqual(stored["head_metadata"]["num_samples"], _NUM_SAMPLES)
    for key in ("scatter", "deciles", "export", "keras_model"):
      self.assertEqual(stored["paths"][key], self.results["paths"][key])

  def test_keras_model_reloads_with_dual_outputs(self):
    dual = keras.saving.load_model(self.results["paths"]["keras_model"])
    x = np.random.default_rng(0).uniform(size=(5, 64)).astype("float32")
    out = dual(x, training=False)
    self.assertEqual(set(out), set(contract.OUTPUT_KEYS))
    self.assertEqual(tuple(out[contract.VARIATION_KEY].shape), (5,))
    self.assertEqual(tuple(out[contract.PREDICTION_KEY].shape), (5, 10))

  def test_log_has_table_and_serving_hint(self):
    text = "\n".join(self.lines)
    for name in _ROWS:
      self.assertIn(f"| {name} |", text)
    self.assertIn("dropvar_model_server", text)
    self.assertIn(self.results["paths"]["export"], text)


class MainTest(tf.test.TestCase):

  def _main_kwargs(self, argv):
    values = flags.FlagValues()
    demo.define_flags(values)
    values(["dropvar"] + argv)
    with mock.patch.object(demo, "FLAGS", values), \
         mock.patch.object(demo, "run") as run:
      demo.main(["dropvar"])
    run.assert_called_once()
    return run.call_args.kwargs

  def test_quick_flag_sets_small_settings(self):
    kwargs = self._main_kwargs(["--quick", "--output_dir=/tmp/x", "--seed=3"])
    self.assertEqual(kwargs["output_dir"], "/tmp/x")
    self.assertEqual(kwargs["seed"], 3)
    self.assertEqual(kwargs["num_samples"], 20)
    self.assertEqual(kwargs["num_perturbed"], 1500)
    self.assertNotIn("quick", kwargs)

  def test_quick_keeps_the_sizes_given(self):
    kwargs = self._main_kwargs(["--quick", "--num_samples=7",
                                "--output_dir=/tmp/x"])
    self.assertEqual((kwargs["num_samples"], kwargs["base_epochs"]), (7, 15))

  def test_bad_sizes_and_an_output_file_are_usage_errors(self):
    for argv in (["--num_samples=-5"], ["--base_epochs=0"],
                 ["--dropout_rate=1.0"]):
      with self.subTest(argv=argv):
        with self.assertRaises(flags.IllegalFlagValueError):
          self._main_kwargs(argv)
    afile = os.path.join(self.get_temp_dir(), "a_file")
    with open(afile, "w") as f:
      f.write("x")
    with self.assertRaisesRegex(app.UsageError, "is a file, not a directory"):
      self._main_kwargs([f"--output_dir={afile}"])

  def test_flags_passed_through(self):
    kwargs = self._main_kwargs(["--num_samples=7", "--noexport",
                                "--dropout_rate=0.2"])
    self.assertEqual(kwargs["num_samples"], 7)
    self.assertFalse(kwargs["export"])
    self.assertEqual(kwargs["dropout_rate"], 0.2)


if __name__ == "__main__":
  tf.test.main()
