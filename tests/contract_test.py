"""Tests of dropvar_tf/contract.py: the output keys of one output or several."""

from dropvar_tf import contract
from dropvar_tf._keras import tf


class OutputKeysTest(tf.test.TestCase):

  def test_single_output_keys_are_the_plain_pair(self):
    self.assertEqual(contract.output_keys(None), ("prediction", "variation"))
    self.assertEqual(contract.prediction_key(), "prediction")
    self.assertEqual(contract.variation_key(), "variation")
    self.assertEqual(contract.output_names(["variation", "prediction"]), [])

  def test_multi_output_keys_round_trip(self):
    keys = contract.output_keys(["value", "klass"])
    self.assertEqual(keys, ("prediction/klass", "prediction/value",
                            "variation/klass", "variation/value"))
    self.assertEqual(contract.output_names(keys), ["klass", "value"])
    outputs = {k: i for i, k in enumerate(keys)}
    self.assertEqual(contract.per_output(outputs, contract.PREDICTION_KEY),
                     {"klass": 0, "value": 1})
    self.assertEqual(contract.per_output(outputs, contract.VARIATION_KEY),
                     {"klass": 2, "value": 3})
    self.assertEqual(contract.per_output({"prediction": 1, "variation": 2},
                                         contract.VARIATION_KEY), {})

  def test_out_of_range_key_is_optional(self):
    self.assertEqual(contract.output_keys(None, out_of_range=True),
                     ("prediction", "variation", "out_of_range"))
    self.assertEqual(contract.output_names(
        ["out_of_range", "prediction", "variation"]), [])
    keys = contract.output_keys(["b", "a"], out_of_range=True)
    self.assertEqual(keys[-1], "out_of_range")
    self.assertEqual(contract.output_names(keys), ["a", "b"])
    self.assertIsNone(contract.output_names(["out_of_range"]))
    self.assertIsNone(contract.output_names(["out_of_range", "prediction"]))

  def test_incomplete_or_mixed_keys_are_not_a_dual(self):
    for keys in (["prediction"], ["prediction/a", "variation/a"],
                 ["prediction/a", "variation/a", "prediction/b"],
                 ["prediction", "variation", "prediction/a", "variation/a",
                  "prediction/b", "variation/b"], ["x", "y"]):
      with self.subTest(keys=keys):
        self.assertIsNone(contract.output_names(keys))


if __name__ == "__main__":
  tf.test.main()
