"""Tests for dropvar_tf.study.tasks (task data and base models)."""

import dataclasses

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import tasks


class LoadTaskTest(tf.test.TestCase):

  def test_cap_is_seeded_subset(self):
    config = dataclasses.replace(config_lib.small_config(), max_train=50,
                                 max_test=20)
    a, short, full = tasks.load_task(config_lib.DIGITS, config)
    b, _, _ = tasks.load_task(config_lib.DIGITS, config)
    self.assertEqual(a.x_train.shape, (50, 64))
    self.assertEqual(a.x_test.shape, (20, 64))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    self.assertEqual(short, "digits (real), 50 train / 20 test")
    self.assertIn("load_digits", full)

  def test_unknown_task(self):
    with self.assertRaisesRegex(ValueError, "argument `task`.*emnist"):
      tasks.load_task("emnist", config_lib.small_config())


if __name__ == "__main__":
  tf.test.main()
