"""The `dropvar` command: the main job, without TensorFlow's start-up lines.

The main job prints its results only: TensorFlow is loaded as the other
commands load it (`cli_help.launch`), then `demo` runs.
"""

from dropvar_tf import cli_help


def run_main():
  """Console entry point `dropvar`.

  Side effect: sets `TF_CPP_MIN_LOG_LEVEL` to 2 (TensorFlow's native errors
  only) unless it is set already.
  """
  cli_help.launch("dropvar_tf.study.demo")
