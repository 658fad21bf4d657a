"""Tests for dropvar_tf.study.cache (the study's stage cache on disk)."""

import dataclasses
import os
import sys
from unittest import mock

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study import cache
from dropvar_tf.study import config as config_lib
from dropvar_tf.study.data import common

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_RATE = config_lib.TARGET_RATE

# The cache files of `small_config()`: an existing cache is reused only while
# these names (the digests of the stage settings) stay the same.
_SMALL_CONFIG_FILES = {
    config_lib.DIGITS: ("digits_r0.3_b192537ccc3b.weights.h5",
                        "digits_r0.3_d66195f34964_targets.npz",
                        "digits_r0.3_6541a2d325dd_reference.npy",
                        "digits_r0.3_568be7e52675_rows.json"),
    config_lib.CRITEO: ("criteo_r0.3_df614b324cd6.weights.h5",
                        "criteo_r0.3_e4db53eaaa71_targets.npz",
                        "criteo_r0.3_49d8fbe2429b_reference.npy",
                        "criteo_r0.3_f94fe077f5b5_rows.json"),
}


def _paths(task, config):
  return tuple(f(task, _RATE, config) for f in (
      cache.base_model_path, cache.targets_path, cache.reference_path,
      cache.rows_path))


class PathTest(tf.test.TestCase):

  def test_file_names_of_the_small_config_are_stable(self):
    folder = os.path.join(self.get_temp_dir(), "names")
    config = config_lib.small_config(cache_dir=folder)
    for task, names in _SMALL_CONFIG_FILES.items():
      self.assertEqual(_paths(task, config),
                       tuple(os.path.join(folder, n) for n in names))
    self.assertTrue(os.path.isdir(folder))

  def test_a_changed_setting_changes_the_name(self):
    folder = self.get_temp_dir()
    config = config_lib.small_config(cache_dir=folder)
    more = dataclasses.replace(config, num_samples=config.num_samples + 1)
    before, after = (_paths(config_lib.DIGITS, c) for c in (config, more))
    # T changes the targets and rows, not the base model.
    self.assertEqual(before[0], after[0])
    for old, new in zip(before[1:], after[1:]):
      self.assertNotEqual(old, new)

  def test_no_cache_dir_no_paths(self):
    config = config_lib.small_config(cache_dir=None)
    self.assertEqual(_paths(config_lib.DIGITS, config), (None,) * 4)


class StageTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.folder = os.path.join(self.get_temp_dir(), self._testMethodName)
    self.config = config_lib.small_config(cache_dir=self.folder)
    self.model = tm.mlp_softmax()
    x = tm.sample_inputs("softmax", 30)
    y = np.zeros(30, "int64")
    self.split = common.Split(x, y, x[:12], y[:12], {})

  def test_mc_targets_written_once_then_read(self):
    fit_x = self.split.x_train
    first = cache.mc_targets(config_lib.DIGITS, self.model, fit_x,
                             self.split, _RATE, self.config,
                             log=lambda m: None)
    self.assertEqual(os.listdir(self.folder), [os.path.basename(
        cache.targets_path(config_lib.DIGITS, _RATE, self.config))])
    with mock.patch.object(cache.targets_lib, "mc_dropout_targets",
                           side_effect=AssertionError("recomputed")):
      again = cache.mc_targets(config_lib.DIGITS, self.model, fit_x,
                               self.split, _RATE, self.config)
    self.assertEqual(set(again), {"fit", "test", "test2"})
    for key, values in first.items():
      np.testing.assert_array_equal(again[key], values)
    self.assertEqual(first["fit"].shape, (30,))
    self.assertEqual(first["test"].shape, (12,))
    # Different seeds: the noise-ceiling run is not the scoring run.
    self.assertFalse(np.array_equal(first["test"], first["test2"]))

  def test_reference_targets_written_once_then_read(self):
    first = cache.reference_targets(config_lib.DIGITS, self.model, self.split,
                                    _RATE, self.config, log=lambda m: None)
    self.assertEqual(os.listdir(self.folder), [os.path.basename(
        cache.reference_path(config_lib.DIGITS, _RATE, self.config))])
    with mock.patch.object(cache.targets_lib, "mc_dropout_targets",
                           side_effect=AssertionError("recomputed")):
      again = cache.reference_targets(config_lib.DIGITS, self.model,
                                      self.split, _RATE, self.config)
    np.testing.assert_array_equal(again, first)

  def test_rows_round_trip(self):
    path = cache.rows_path(config_lib.DIGITS, _RATE, self.config)
    rows = [{"estimator": "a", "spearman": 0.5, "layers": None}]
    info = {"task": "digits", "quality": ["accuracy", 0.9]}
    cache.write_rows(path, rows, info)
    self.assertEqual(cache.read_rows(path), (rows, info))
    self.assertEqual(os.listdir(self.folder), [os.path.basename(path)])


if __name__ == "__main__":
  tf.test.main()
