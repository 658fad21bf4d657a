"""The one place dropvar_tf imports TensorFlow and Keras.

dropvar_tf needs Keras 3 as shipped with TensorFlow 2.21 (`tf.keras` is Keras 3
there). Importing it anywhere else would let a mismatched install fail later,
deep inside a layer, with a message that does not say how to fix it.
"""

import tensorflow as tf

try:
  import keras
except ImportError as e:  # pragma: no cover - depends on the install.
  raise ImportError(
      "dropvar_tf requires Keras 3 (`pip install 'keras>=3.10'`), which "
      "TensorFlow 2.21 installs. Do not install `tf-keras`.") from e

_KERAS_MAJOR = int(keras.__version__.split(".")[0])
if _KERAS_MAJOR < 3:  # pragma: no cover - depends on the install.
  raise ImportError(
      f"dropvar_tf requires Keras 3; found Keras {keras.__version__}. "
      "Run `pip install -U 'tensorflow>=2.21,<2.22' 'keras>=3.10'` and make "
      "sure TF_USE_LEGACY_KERAS is not set.")

__all__ = ["tf", "keras"]
