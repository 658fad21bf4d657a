"""Reads the .npy and .npz files the CLIs take, with errors that name them.

`np.load(..., allow_pickle=False)` refuses arrays of Python objects (what a
pandas string column gives) with a message naming neither the file nor the
array; here it names both and says how to save strings instead.

Example:

```python
x = load_npy("inputs.npy")        # a numpy array
named = load_npz("inputs.npz")    # {name: numpy array}
```
"""

import numpy as np

# The start of numpy's message for an object array read without pickle (a
# file that is no .npy at all gets another).
_OBJECT_ARRAYS = "Object arrays cannot be loaded"


def _object_array_error(path, name=None):
  where = path if name is None else f"{path}: array {name!r}"
  return ValueError(
      f"{where} holds Python objects (dtype=object, e.g. strings from "
      "pandas), which are not read without pickle; save strings with a "
      "string dtype, e.g. np.asarray(column, dtype=str).")


def load_npy(path):
  """The array of a .npy file.

  Raises:
    ValueError: the file holds an object array.
    OSError: the file cannot be read.
  """
  try:
    return np.load(path, allow_pickle=False)
  except ValueError as e:
    if str(e).startswith(_OBJECT_ARRAYS):
      raise _object_array_error(path) from None
    raise


def load_npz(path):
  """{name: array} of a .npz file, in the file's order.

  Raises:
    ValueError: an array of the file holds objects.
    OSError: the file cannot be read.
  """
  with np.load(path, allow_pickle=False) as data:
    arrays = {}
    for name in data.files:
      try:
        arrays[name] = data[name]
      except ValueError as e:
        if str(e).startswith(_OBJECT_ARRAYS):
          raise _object_array_error(path, name) from None
        raise
  return arrays
