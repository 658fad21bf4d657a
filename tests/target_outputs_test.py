"""Tests of dropvar_tf/target_outputs.py: targets of one output or several."""

import numpy as np

from dropvar_tf import contract
from dropvar_tf import target_outputs
from dropvar_tf._keras import tf
import testing_models as tm


class TargetOutputsTest(tf.test.TestCase):

  def test_std_from_sums_is_the_population_std(self):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(7, 5, 3))
    got = target_outputs.std_from_sums(y.sum(0), (y * y).sum(0), 7)
    self.assertAllClose(got, y.std(axis=0), rtol=1e-10)

  def test_resolve_names_and_statistics_per_output(self):
    outputs = target_outputs.resolve(tm.multi_output("list"), "auto")
    self.assertEqual(outputs.names, ["value", "klass"])
    self.assertEqual(outputs.shapes, [(1,), (tm.NUM_CLASSES,)])
    self.assertEqual(outputs.statistics, [contract.STAT_STD,
                                          contract.STAT_PREDICTED_CLASS_STD])
    outputs = target_outputs.resolve(
        tm.multi_output("dict"), {"klass": contract.STAT_PER_CLASS_STD,
                                  "value": contract.STAT_STD})
    self.assertEqual(outputs.names, ["klass", "value"])
    self.assertEqual(outputs.statistics, [contract.STAT_PER_CLASS_STD,
                                          contract.STAT_STD])
    single = target_outputs.resolve(tm.regression(), "auto")
    self.assertIsNone(single.names)
    self.assertEqual(single.settings(), (contract.STAT_STD, [1]))

  def test_several_outputs_split_as_each_alone(self):
    rng = np.random.default_rng(1)
    det = rng.uniform(size=(4, 4))  # unit 0: "value"; units 1-3: "klass"
    s1, s2 = rng.normal(size=(4, 4)), rng.uniform(2, 3, size=(4, 4))
    outputs = target_outputs.TargetOutputs(
        ["value", "klass"], [(1,), (3,)],
        [contract.STAT_STD, contract.STAT_PREDICTED_CLASS_STD])
    parts = [outputs.finalize(det[:2], (s1[:2], s2[:2]), 5),
             outputs.finalize(det[2:], (s1[2:], s2[2:]), 5)]
    got = outputs.concat(parts)
    std = target_outputs.std_from_sums(s1, s2, 5)
    self.assertAllClose(got["value"], std[:, 0])
    self.assertAllClose(got["klass"], target_outputs.reduce(
        std[:, 1:], det[:, 1:], contract.STAT_PREDICTED_CLASS_STD, (3,)))
    empty = outputs.concat([])
    self.assertEqual({k: v.shape for k, v in empty.items()},
                     {"value": (0,), "klass": (0,)})

  def test_bad_statistic_dict_names_the_argument(self):
    with self.assertRaisesRegex(
        ValueError, r"argument `statistic`\. Expected one of .* keyed by the "
        r"output names \['value', 'klass'\]\. Received: statistic=\{'value'"):
      target_outputs.resolve(tm.multi_output("list"), {"value": "std"})


if __name__ == "__main__":
  tf.test.main()
