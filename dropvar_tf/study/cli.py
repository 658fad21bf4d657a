"""Runs the fidelity study and writes its report (see `dropvar_tf.study`).

  python -m dropvar_tf.study.cli --output_dir=docs            # full study
  python -m dropvar_tf.study.cli --output_dir=/tmp/s --small  # smoke run
  python -m dropvar_tf.study.cli --tasks=digits,mnist --rates=0.3
  python -m dropvar_tf.study.cli --shift --output_dir=docs     # docs/shift.md

Writes results.md, results.json and PNG plots to --output_dir; with --shift,
only the shift study (`dropvar_tf.study.shift`): shift.md, shift.json and
shift.png. Base models,
MC targets and finished configurations are cached under --cache_dir, so an
interrupted run resumes and a finished one re-renders its report from the
cache.
"""

import dataclasses
import os
import sys
import warnings

from absl import app
from absl import flags
from absl import logging

from dropvar_tf import cli_help
from dropvar_tf import validation
from dropvar_tf._keras import tf
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import report
from dropvar_tf.study import runner
from dropvar_tf.study import shift

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  """Defines the study's flags on `flag_values` (kept out of import time so
  that other absl tools can be imported into the same process)."""
  full, small = config_lib.StudyConfig(), config_lib.small_config()
  flags.DEFINE_string(
      "output_dir", "docs", "Where results.md, results.json and plots go.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "cache_dir", "runs/study_cache",
      "Cache of base models, MC targets and result rows ('' for none).",
      flag_values=flag_values)
  flags.DEFINE_bool(
      "small", False, "Tiny data, T=10, one rate, few epochs (tests, smoke).",
      flag_values=flag_values)
  flags.DEFINE_list(
      "tasks", None, f"Subset of {','.join(config_lib.TASKS)} (default: all; "
      f"{','.join(small.tasks)} with --small).", flag_values=flag_values)
  flags.DEFINE_list(
      "rates", None,
      f"Dropout rates (default {','.join(map(str, full.dropout_rates))}; "
      f"{','.join(map(str, small.dropout_rates))} with --small).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_samples", None, f"T: MC passes per target (default "
      f"{full.num_samples}; {small.num_samples} with --small).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_perturbed", None, "Perturbed calibration inputs per head "
      f"(default {full.num_perturbed}; {small.num_perturbed} with --small).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "head_epochs", None,
      f"Maximum head epochs (default {full.head_epochs}).",
      flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "Global seed.", flag_values=flag_values)
  flags.DEFINE_bool(
      "shift", False, "Run the shift study instead (shift.md; tasks "
      f"{','.join(shift.SHIFT_TASKS)} unless --tasks says otherwise).",
      flag_values=flag_values)


def make_config(small=False, tasks=None, rates=None, num_samples=None,
                num_perturbed=None, head_epochs=None, seed=0, cache_dir=None):
  """Builds a `StudyConfig` from flag values (None keeps the default).

  Args:
    small: start from `config.small_config()` instead of `StudyConfig()`.
    tasks: task names, or None.
    rates: dropout rates as strings, or None.
    num_samples: T, or None.
    num_perturbed: calibration inputs, or None.
    head_epochs: maximum head epochs, or None.
    seed: the global seed.
    cache_dir: the cache folder (None: no cache).

  Returns:
    A checked `StudyConfig`.

  Raises:
    ValueError: a rate that is not a float, or an invalid config.
  """
  config = (config_lib.small_config(cache_dir=cache_dir) if small
            else config_lib.StudyConfig(cache_dir=cache_dir))
  changes = {"seed": seed}
  if tasks:
    changes["tasks"] = tuple(tasks)
  if rates:
    try:
      changes["dropout_rates"] = tuple(float(r) for r in rates)
    except ValueError:
      raise validation.invalid("rates", "comma-separated floats in (0, 1)",
                               ",".join(rates)) from None
  for key, value in (("num_samples", num_samples),
                     ("num_perturbed", num_perturbed),
                     ("head_epochs", head_epochs)):
    if value is not None:
      changes[key] = value
  return config_lib.check_config(dataclasses.replace(config, **changes))


def main(argv):
  del argv
  task_names = FLAGS.tasks
  if FLAGS.shift and not task_names:
    task_names = list(shift.SHIFT_TASKS)
  if os.path.exists(FLAGS.output_dir) and not os.path.isdir(FLAGS.output_dir):
    raise app.UsageError(f"--output_dir={FLAGS.output_dir} is a file, not a "
                         "directory.")
  try:
    config = make_config(FLAGS.small, task_names, FLAGS.rates,
                         FLAGS.num_samples, FLAGS.num_perturbed,
                         FLAGS.head_epochs, FLAGS.seed,
                         FLAGS.cache_dir or None)
  except ValueError as e:  # A bad flag value, named: before any work.
    raise app.UsageError(str(e)) from None
  # Keras warns on every head fit that a pre-shuffled dataset is not
  # shuffled again, and on every cached base model that its optimizer state
  # is not loaded (none is needed); both are intended and would drown the
  # progress lines, as would TF's tf.function retracing hints (Keras'
  # predict on inputs of a few sizes).
  warnings.filterwarnings("ignore", message=".*shuffle=True.*")
  warnings.filterwarnings("ignore",
                          message="Skipping variable loading for optimizer")
  tf.get_logger().setLevel("ERROR")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.shift:
    results = shift.run_shift_study(config, FLAGS.output_dir,
                                    log=lambda m: print(m, flush=True))
    print(f"Report: {results['paths']['report']}")
    return 0
  results = runner.run_study(config, FLAGS.output_dir,
                             log=lambda m: print(m, flush=True))
  print(report.checks_table(results["checks"]))
  print(f"Report: {results['paths']['report']}")
  return 0


def run_main():
  """Console entry point of `python -m dropvar_tf.study.cli`."""
  define_flags()
  cli_help.run(main, __name__, __doc__)


if __name__ == "__main__":
  sys.exit(run_main())
