"""Smoke test of bench/serving_load_bench.py's census on a zoo model."""

import os
import sys
import tempfile
from unittest import mock

from absl import flags
import numpy as np

from dropvar_tf._keras import tf

sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import serving_load_bench  # noqa: E402  (a script, not a package)


def _flag_values(*argv):
  flag_values = flags.FlagValues()
  serving_load_bench.define_flags(flag_values)
  flag_values(["serving_load_bench"] + list(argv))
  return flag_values


class CensusTest(tf.test.TestCase):

  def _census(self, *argv):
    with mock.patch.object(serving_load_bench, "FLAGS",
                           _flag_values(*argv)), \
        tempfile.TemporaryDirectory() as base_dir:
      serving_load_bench._export_models(base_dir)
      return serving_load_bench.census(base_dir, rounds=1, passes=2)

  def test_zoo_model_is_exported_and_run_in_a_session(self):
    counts, times = self._census("--model=lstm", "--size=6")
    self.assertCountEqual(counts, serving_load_bench._MODELS)
    # The head adds ops, the default head more than the cheapest one.
    self.assertGreater(sum(counts["dual"].values()),
                       sum(counts["base"].values()) + 20)
    self.assertGreater(sum(counts["dual"].values()),
                       sum(counts["minimal"].values()))
    for name, t in times.items():
      self.assertLen(t, 1)
      self.assertTrue(np.all(t > 0), msg=name)

  def test_inputs_follow_the_model(self):
    with mock.patch.object(serving_load_bench, "FLAGS",
                           _flag_values("--model=lstm", "--size=6")):
      tokens = serving_load_bench._inputs(3, 0)
    with mock.patch.object(serving_load_bench, "FLAGS", _flag_values()):
      features = serving_load_bench._inputs(3, 0)
    self.assertEqual((tokens.shape, tokens.dtype), ((3, 6), np.int32))
    self.assertEqual((features.shape, features.dtype),
                     ((3, serving_load_bench._FEATURES), np.float32))

  def test_single_threaded_executor_runs_the_mlp(self):
    counts, times = self._census("--width=8",
                                 "--census_session=single_threaded")
    self.assertCountEqual(times, serving_load_bench._MODELS)
    self.assertGreater(sum(counts["dual"].values()),
                       sum(counts["base"].values()))

  def test_jit_compiled_exports_run_as_one_xla_program(self):
    counts, times = self._census("--width=8", "--jit_compile")
    self.assertCountEqual(times, serving_load_bench._MODELS)
    for name, count in counts.items():
      # The model's ops are in the compiled function, not in the Session's
      # graph: one call of it (XLA compiles it when it runs), and no MatMul
      # left outside it.
      self.assertNotIn("MatMul", count, msg=name)
      self.assertEqual(count["StatefulPartitionedCall"], 1,
                       msg=(name, dict(count)))

  def test_variable_head_reads_the_head_weights_the_dual_has_as_constants(
      self):
    counts, times = self._census("--width=8", "--variable_head")
    variable = serving_load_bench._VARIABLE_HEAD
    self.assertCountEqual(times, serving_load_bench._MODELS + (variable,))
    # The base reads its 4 Dense layers' kernels and biases; so does the
    # dual, whose head weights are constants; the variable head reads more.
    self.assertEqual(counts["base"]["VarHandleOp"], 8)
    self.assertEqual(counts["dual"]["VarHandleOp"], 8)
    self.assertEqual(counts["minimal"]["VarHandleOp"], 8)
    self.assertGreater(counts[variable]["VarHandleOp"], 8 + 10)

  def test_plain_too_serves_base_and_dual_without_xla_beside_them(self):
    counts, times = self._census("--width=8", "--jit_compile", "--plain_too")
    plain = serving_load_bench._PLAIN
    self.assertCountEqual(times, serving_load_bench._MODELS + plain)
    for name in plain:
      self.assertIn("MatMul", str(dict(counts[name])), msg=name)
    self.assertNotIn("MatMul", str(dict(counts["dual"])))
    self.assertGreater(sum(counts["dual_plain"].values()),
                       sum(counts["base_plain"].values()) + 20)

  def test_plain_too_without_jit_compile_is_a_usage_error(self):
    with self.assertRaisesRegex(flags.IllegalFlagValueError,
                                "--plain_too needs --jit_compile"):
      _flag_values("--plain_too")


if __name__ == "__main__":
  tf.test.main()
