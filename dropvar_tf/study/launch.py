"""The `dropvar` command: the main job, without TensorFlow's start-up lines.

TensorFlow's native libraries write INFO and ERROR lines to stderr while
they load and while they first look for devices (oneDNN, CUDA stubs), before
absl's logging is set up, so `TF_CPP_MIN_LOG_LEVEL` does not hold them back.
The main job prints its results only: this entry point keeps TensorFlow's
native INFO and WARNING lines off, loads TensorFlow and looks for its
devices with the process's stderr pointed at /dev/null, then runs `demo`.
A failed import still raises, and its error is printed once stderr is
back.
"""

import contextlib
import os
import sys


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


def run_main():
  """Console entry point `dropvar`.

  Side effect: sets `TF_CPP_MIN_LOG_LEVEL` to 2 (TensorFlow's native errors
  only) unless it is set already.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with native_stderr_silenced():
    import tensorflow as tf  # noqa: PLC0415 - loaded here, quietly
    tf.config.list_physical_devices()
  from dropvar_tf.study import demo  # noqa: PLC0415 - after TensorFlow
  demo.run_main()
