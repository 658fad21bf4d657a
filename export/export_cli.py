r"""dropvar_export: exports a saved `.keras` dual model for TF Serving.

Writes `<export_base>/<version>/` (see `dropvar_tf.saved_model`) and prints
the path of the new version folder on stdout.

Usage:

  dropvar_export --model=dual.keras --export_base=/models/movielens \
      [--version=3] [--warmup=examples.npz] [--mc_num_samples=100] [--seed=0]

`--warmup` takes a `.npy` file (single-input models) or a `.npz` file whose
array names are the input names (`np.savez(f, user_id=..., movie_id=...)`).
"""

import os
import sys

from absl import app
from absl import flags

# `keras.saving.load_model` rebuilds a dual model without custom_objects:
# the package's Keras layers are registered by `import dropvar_tf` in other
# programs, and by `cli_help.launch` for the `dropvar_export` command.
from dropvar_tf import array_files
from dropvar_tf import cli_help
from dropvar_tf import saved_model
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  """Defines the tool's flags on `flag_values` (kept out of import time so
  that other absl tools can be imported into the same process)."""
  flags.DEFINE_string("model", None, "Path of a saved `.keras` dual model.",
                      flag_values=flag_values)
  flags.DEFINE_string("export_base", None,
                      "Model base path (TF Serving's --model_base_path); the "
                      "version folder is written inside it.",
                      flag_values=flag_values)
  flags.DEFINE_integer("version", None,
                       "Positive version number; default: the largest "
                       "existing version + 1.", flag_values=flag_values)
  flags.DEFINE_string("warmup", None,
                      "Optional .npy or .npz file of example inputs for "
                      "assets.extra/tf_serving_warmup_requests.",
                      flag_values=flag_values)
  flags.DEFINE_integer("mc_num_samples", None,
                       "If set (>= 2), add the `mc_dropout` signature with "
                       "this many stochastic passes.", flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "Seed of the `mc_dropout` masks.",
                       flag_values=flag_values)
  flags.DEFINE_bool("jit_compile", False,
                    "Compile serving_default with XLA (see "
                    "`export_saved_model`; tensorflow_model_server then needs "
                    "--xla_cpu_compilation_enabled=true).",
                    flag_values=flag_values)
  flags.DEFINE_bool("safe_mode", True,
                    "Load the model in Keras safe mode (refuses Lambda layers "
                    "with Python code; turn off only for files you trust).",
                    flag_values=flag_values)


def load_warmup(path):
  """Reads warmup examples: an array (.npy) or a dict of arrays (.npz).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: not a .npy / .npz file, or one of Python objects.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--warmup file {path!r} does not exist.")
  if path.endswith(".npy"):
    return array_files.load_npy(path)
  if path.endswith(".npz"):
    arrays = array_files.load_npz(path)
    # `np.savez(f, x)` names a positional array "arr_0": one unnamed input.
    if list(arrays) == ["arr_0"]:
      return arrays["arr_0"]
    return arrays
  raise ValueError(f"--warmup must be a .npy or .npz file; received {path!r}.")


def export_from_flags(flag_values=FLAGS):
  """Loads the model named by the flags, exports it and returns the path.

  Raises:
    FileNotFoundError: the model or warmup file does not exist.
    ValueError: a missing flag or an invalid export argument.
    FileExistsError: the version already exists.
  """
  for name in ("model", "export_base"):
    if not flag_values[name].value:
      raise ValueError(f"--{name} is required.")
  model_path = flag_values.model
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"--model file {model_path!r} does not exist.")
  warmup = (None if flag_values.warmup is None
            else load_warmup(flag_values.warmup))
  dual = keras.saving.load_model(model_path, compile=False,
                                 safe_mode=flag_values.safe_mode)
  return saved_model.export_saved_model(
      dual, flag_values.export_base, version=flag_values.version,
      warmup_examples=warmup, mc_num_samples=flag_values.mc_num_samples,
      seed=flag_values.seed, jit_compile=flag_values.jit_compile)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_help.quiet_python_logs(FLAGS)
  try:
    path = export_from_flags(FLAGS)
  except (ValueError, OSError) as e:
    # Bad flags or files, a full disk: one line, no traceback.
    print(f"dropvar_export: error: {e}", file=sys.stderr)
    return 1
  except tf.errors.OpError as e:
    # TensorFlow's own file errors (a write that failed half-way).
    first = (e.message or str(e) or type(e).__name__).splitlines()[0]
    print(f"dropvar_export: error: {first}", file=sys.stderr)
    return 1
  print(path)
  base = os.path.abspath(FLAGS.export_base)
  print(f"Serve it with: tensorflow_model_server --port=8500 "
        f"--model_name={os.path.basename(base)} --model_base_path={base}",
        file=sys.stderr)
  return 0


def run_main():
  """Console entry point `dropvar_export`."""
  define_flags()
  cli_help.run(main, __name__, __doc__)


if __name__ == "__main__":
  run_main()
