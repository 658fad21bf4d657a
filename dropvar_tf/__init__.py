"""dropvar_tf: one-pass dropout prediction variation (DPV) for Keras models."""

from dropvar_tf.version import __version__
