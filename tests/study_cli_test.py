"""Tests for dropvar_tf.study.cli (flags to a `StudyConfig`, main)."""

from dropvar_tf._keras import tf
from dropvar_tf.study import cli


class MakeConfigTest(tf.test.TestCase):

  def test_cli_config(self):
    config = cli.make_config(small=True, tasks=["digits"],
                             rates=["0.1", "0.5"], num_samples=4)
    self.assertEqual(config.tasks, ("digits",))
    self.assertEqual(config.dropout_rates, (0.1, 0.5))
    self.assertEqual(config.num_samples, 4)
    self.assertEqual(config.label, "small")
    with self.assertRaisesRegex(ValueError, "argument `rates`"):
      cli.make_config(rates=["x"])


if __name__ == "__main__":
  tf.test.main()
