"""`--help` of the console entry points: their usage and their own flags.

absl's `--help` prints the `__main__` module's docstring and the flags of
the module named by `sys.argv[0]`. A console entry point's `__main__` is the
script pip generates, with neither: `--help` printed only "USAGE: prog
[flags]". `run` gives it the tool's docstring and flags first.
"""

import sys

from absl import app
from absl import flags


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
