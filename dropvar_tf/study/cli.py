"""Runs the fidelity study and writes its report (see `dropvar_tf.study`).

  python -m dropvar_tf.study.cli --output_dir=docs            # full study
  python -m dropvar_tf.study.cli --output_dir=/tmp/s --small  # < 1 minute
  python -m dropvar_tf.study.cli --tasks=digits,mnist --rates=0.3

Writes results.md, results.json and PNG plots to --output_dir. Base models,
MC targets and finished configurations are cached under --cache_dir, so an
interrupted run resumes and a finished one re-renders its report in seconds.
"""

import dataclasses
import sys
import warnings

from absl import app
from absl import flags

from dropvar_tf import validation
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import report
from dropvar_tf.study import runner

_FLAGS = {}


def define_flags(fv=flags.FLAGS):
  """Defines the study's flags on `fv` (kept out of import time)."""
  _FLAGS["output_dir"] = flags.DEFINE_string(
      "output_dir", "docs", "Where results.md, results.json and plots go.",
      flag_values=fv)
  _FLAGS["cache_dir"] = flags.DEFINE_string(
      "cache_dir", "runs/study_cache",
      "Cache of base models, MC targets and result rows ('' for none).",
      flag_values=fv)
  _FLAGS["small"] = flags.DEFINE_bool(
      "small", False, "Tiny data, T=10, one rate, few epochs (tests, smoke).",
      flag_values=fv)
  _FLAGS["tasks"] = flags.DEFINE_list(
      "tasks", None, "Subset of movielens,criteo,digits,mnist (default: all; "
      "digits,criteo with --small).", flag_values=fv)
  _FLAGS["rates"] = flags.DEFINE_list(
      "rates", None, "Dropout rates (default 0.1,0.3,0.5; 0.3 with --small).",
      flag_values=fv)
  _FLAGS["num_samples"] = flags.DEFINE_integer(
      "num_samples", None, "T: MC passes per target (default 100; 10 with "
      "--small).", flag_values=fv)
  _FLAGS["num_perturbed"] = flags.DEFINE_integer(
      "num_perturbed", None, "Perturbed calibration inputs per head "
      "(default 8000).", flag_values=fv)
  _FLAGS["head_epochs"] = flags.DEFINE_integer(
      "head_epochs", None, "Maximum head epochs (default 60).",
      flag_values=fv)
  _FLAGS["seed"] = flags.DEFINE_integer("seed", 0, "Global seed.",
                                        flag_values=fv)


def make_config(small=False, tasks=None, rates=None, num_samples=None,
                num_perturbed=None, head_epochs=None, seed=0, cache_dir=None):
  """Builds a `StudyConfig` from flag values (None keeps the default)."""
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
  f = {k: v.value for k, v in _FLAGS.items()}
  config = make_config(f["small"], f["tasks"], f["rates"], f["num_samples"],
                       f["num_perturbed"], f["head_epochs"], f["seed"],
                       f["cache_dir"] or None)
  # Keras warns on every head fit that a pre-shuffled dataset is not
  # shuffled again; that is intended and would drown the progress lines.
  warnings.filterwarnings("ignore", message=".*shuffle=True.*")
  results = runner.run_study(config, f["output_dir"],
                             log=lambda m: print(m, flush=True))
  print(report.checks_table(results["checks"]))
  print(f"Report: {results['paths']['report']}")
  return 0


def run_main():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  sys.exit(run_main())
