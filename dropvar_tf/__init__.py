"""dropvar_tf: one-pass dropout prediction variation (DPV) for Keras models.

  import dropvar_tf as dv
  dual = dv.add_variation_head(model)
  targets = dv.mc_dropout_targets(model, x_cal, num_samples=100, seed=0)
  dv.fit_variation_head(dual, x_cal, targets)
  out = dual.predict(x)            # {"prediction": ..., "variation": ...}

Each public name below imports its module on first use (PEP 562). Importing
the package does load the modules that define its Keras layers (and so
TensorFlow): Keras finds the layers of a saved dual (`.keras`) only once they
are registered, and has no hook to import them on demand. The one exception
is a run of one of the package's own modules (`python -m dropvar_tf.beam.
targets_pipeline --help`) or of the `dropvar` command: those import what they
use themselves, so they parse their flags and answer `--help` before
TensorFlow loads, or load it quietly.
"""

import importlib
import os
import sys

from dropvar_tf import contract as _contract
from dropvar_tf.version import __version__
from dropvar_tf.contract import OUT_OF_RANGE_KEY
from dropvar_tf.contract import OUTPUT_KEYS
from dropvar_tf.contract import PREDICTION_KEY
from dropvar_tf.contract import SERVING_SIGNATURE
from dropvar_tf.contract import VARIATION_KEY

# Public name -> the module that defines it.
_LAZY = {
    "perturb_inputs": "dropvar_tf.augment",
    "dropout_sources": "dropvar_tf.sources",
    "register_dropout_source": "dropvar_tf.sources",
    "unregister_dropout_source": "dropvar_tf.sources",
    "add_variation_head": "dropvar_tf.heads",
    "candidate_layers": "dropvar_tf.heads",
    "has_variation_head": "dropvar_tf.heads",
    "strip_variation_head": "dropvar_tf.heads",
    "variation_head_metadata": "dropvar_tf.heads",
    "ActivationProbe": "dropvar_tf.layers",
    "ActivationStrength": "dropvar_tf.layers",
    "decile_table": "dropvar_tf.metrics",
    "fidelity": "dropvar_tf.metrics",
    "mc_convergence": "dropvar_tf.metrics",
    "noise_ceiling": "dropvar_tf.metrics",
    "moment_model": "dropvar_tf.moments",
    "moment_propagation_variation": "dropvar_tf.moments",
    "check_serving_ops": "dropvar_tf.export_checks",
    "export_saved_model": "dropvar_tf.saved_model",
    "read_export_metadata": "dropvar_tf.saved_model",
    "mc_dropout_model": "dropvar_tf.seeded_dropout",
    "mc_dropout_targets": "dropvar_tf.targets",
    "predict": "dropvar_tf.predicting",
    "fit_variation_head": "dropvar_tf.training",
    "train_variation_head": "dropvar_tf.training",
}

__all__ = [
    "ActivationProbe",
    "ActivationStrength",
    "OUTPUT_KEYS",
    "OUT_OF_RANGE_KEY",
    "PREDICTION_KEY",
    "SERVING_SIGNATURE",
    "VARIATION_KEY",
    "__version__",
    "add_variation_head",
    "candidate_layers",
    "check_serving_ops",
    "decile_table",
    "dropout_sources",
    "export_saved_model",
    "fidelity",
    "fit_variation_head",
    "has_variation_head",
    "mc_convergence",
    "mc_dropout_model",
    "mc_dropout_targets",
    "moment_model",
    "moment_propagation_variation",
    "noise_ceiling",
    "perturb_inputs",
    "predict",
    "read_export_metadata",
    "register_dropout_source",
    "strip_variation_head",
    "train_variation_head",
    "unregister_dropout_source",
    "variation_head_metadata",
]


def __getattr__(name):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  # Cached: later lookups are plain module attributes.
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


# Console scripts that load TensorFlow themselves (`study.launch`,
# `cli_help.launch`).
_OWN_COMMANDS = ("dropvar", "dropvar_export", "dropvar_client",
                 "dropvar_model_server")


def _runs_own_module(argv=None):
  """True when the process was started as `python -m dropvar_tf.<module>`,
  or as one of the package's commands that load TensorFlow themselves.

  Args:
    argv: the interpreter's command line (default `sys.orig_argv`).
  """
  argv = list(sys.orig_argv if argv is None else argv)
  if len(argv) > 1 and os.path.basename(argv[1]) in _OWN_COMMANDS:
    return True
  for i, arg in enumerate(argv[1:], 1):
    if arg == "-m":
      return i + 1 < len(argv) and argv[i + 1].startswith(__name__ + ".")
    if arg.startswith("-m"):
      return arg[2:].startswith(__name__ + ".")
    if not arg.startswith("-"):
      return False  # A script (or `-c` code) runs, not a module.
  return False


if not _runs_own_module():
  for _module in _contract.KERAS_OBJECT_MODULES:
    importlib.import_module(_module)
  del _module
