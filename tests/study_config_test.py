"""Tests for dropvar_tf.study.config (the study's settings)."""

import dataclasses

from dropvar_tf._keras import tf
from dropvar_tf.study import config as config_lib


class ConfigTest(tf.test.TestCase):

  def test_unknown_task(self):
    config = dataclasses.replace(config_lib.small_config(), tasks=("emnist",))
    with self.assertRaisesRegex(ValueError, "argument `tasks`.*emnist"):
      config_lib.check_config(config)

  def test_bad_rate(self):
    config = dataclasses.replace(config_lib.small_config(),
                                 dropout_rates=(1.5,))
    with self.assertRaisesRegex(ValueError, "argument `dropout_rates`"):
      config_lib.check_config(config)

  def test_not_a_config(self):
    with self.assertRaisesRegex(ValueError, "argument `config`"):
      config_lib.check_config({"tasks": ("digits",)})


if __name__ == "__main__":
  tf.test.main()
