"""The console entry points: a quiet start, and `--help` that describes them.

* TensorFlow's native libraries write INFO and ERROR lines to stderr while
  they load and first look for devices (oneDNN, CUDA stubs), before absl's
  logging is set up, so `TF_CPP_MIN_LOG_LEVEL` set later does not hold them
  back. `launch(module)` (behind `dropvar_export`, `dropvar_client` and
  `dropvar_model_server`; `study.launch` for `dropvar`) keeps TensorFlow's
  native INFO and WARNING lines off, loads TensorFlow with the process's
  stderr pointed at /dev/null, then runs the tool. A failed import still
  raises, and its error is printed once stderr is back. This module imports
  TensorFlow only inside those functions, never at import.
* absl's `--help` prints the `__main__` module's docstring and the flags of
  the module named by `sys.argv[0]`. A console entry point's `__main__` is
  the script pip generates, with neither: `--help` printed only "USAGE: prog
  [flags]". `run` gives it the tool's docstring and flags first.
"""

import contextlib
import importlib
import os
import sys

from absl import app
from absl import flags

from dropvar_tf import contract


@contextlib.contextmanager
def native_stderr_silenced():
  """Points file descriptor 2 at /dev/null inside, and back afterwards.

  Side effect: for its duration, whatever the process writes to stderr
  (native libraries included) is dropped.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def load_tensorflow_quietly():
  """Imports TensorFlow and finds its devices without their start-up lines.

  Side effect: sets `TF_CPP_MIN_LOG_LEVEL` to 2 (TensorFlow's native errors
  only) unless it is set already.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with native_stderr_silenced():
    import tensorflow as tf  # noqa: PLC0415 - loaded here, quietly
    tf.config.list_physical_devices()


def launch(module, keras_objects=False):
  """Loads TensorFlow quietly, then runs `run_main()` of `module`.

  Args:
    module: the tool's module name.
    keras_objects: also register dropvar_tf's Keras layers first (which
      `import dropvar_tf` skips for the package's own commands), for a
      tool that loads `.keras` files.
  """
  load_tensorflow_quietly()
  if keras_objects:
    # What `import dropvar_tf` does for every other program.
    for name in contract.KERAS_OBJECT_MODULES:
      importlib.import_module(name)
  importlib.import_module(module).run_main()


def export_main():
  """Console entry point `dropvar_export`."""
  launch("dropvar_tf.export.export_cli", keras_objects=True)


def client_main():
  """Console entry point `dropvar_client`."""
  launch("dropvar_tf.serving.client_cli")


def server_main():
  """Console entry point `dropvar_model_server`."""
  launch("dropvar_tf.serving.server")


def quiet_python_logs(flag_values=flags.FLAGS):
  """Keeps TensorFlow's and absl's Python INFO lines off the terminal.

  Those are TensorFlow's asset-write and restore lines of an export, and
  absl's INFO; their warnings and errors still show. With `--verbosity`
  given, both keep absl's level.
  """
  if "verbosity" in flag_values and flag_values["verbosity"].present:
    return
  from absl import logging  # noqa: PLC0415
  from dropvar_tf._keras import tf  # noqa: PLC0415 - the tools load it
  tf.get_logger().setLevel("WARNING")
  logging.set_verbosity(logging.WARNING)


def run(main, module_name, doc, flag_values=flags.FLAGS):
  """`app.run(main)`, with `--help` describing the tool.

  Args:
    main: the tool's `main(argv)`.
    module_name: the module that defined the tool's flags (its
      `__name__`); those flags become the key flags `--help` lists.
    doc: the usage text `--help` prints first (the tool's docstring).
    flag_values: the `flags.FlagValues` the flags are defined on.
  """
  main_module = sys.modules["__main__"]
  if not getattr(main_module, "__doc__", None):
    # absl formats "%" in the usage text with the program name.
    main_module.__doc__ = doc.replace("%", "%%")
  for flag in flag_values.get_flags_for_module(module_name):
    flag_values.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)
