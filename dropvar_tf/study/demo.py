"""The main job: the whole dropvar_tf chain on scikit-learn's digits.

  dropvar --output_dir=runs/digits          # full run (T=100)
  dropvar --quick                            # a fast smoke run

Trains a base MLP with dropout, computes MC-dropout targets, fits the
variation head on perturbed calibration inputs, evaluates the one-pass
estimate against held-out MC targets next to the baselines and the noise
ceiling, saves plots, and exports one SavedModel for TF Serving.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from dropvar_tf import cli_help

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  """Defines the job's flags on `flag_values` (kept out of import time so
  that other absl tools can be imported into the same process)."""
  flags.DEFINE_string(
      "output_dir", "runs/digits", "Where plots, report and export go.",
      flag_values=flag_values)
  # Bounds are checked as the flags are parsed: a bad value is one usage
  # line before any work, not a traceback after the base model trained.
  flags.DEFINE_integer(
      "num_samples", 100, "T: stochastic passes per MC target.",
      lower_bound=2, flag_values=flag_values)
  flags.DEFINE_float(
      "dropout_rate", 0.3, "Dropout rate of the base model.",
      lower_bound=0.0, upper_bound=0.99, flag_values=flag_values)
  flags.DEFINE_integer(
      "num_perturbed", 16000,
      "Perturbed calibration inputs for the head (at least 100).",
      lower_bound=100, flag_values=flag_values)
  flags.DEFINE_integer(
      "base_epochs", 60, "Epochs of base-model training.",
      lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer(
      "head_epochs", 60, "Maximum epochs of head training.",
      lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "Global seed.", flag_values=flag_values)
  flags.DEFINE_bool(
      "quick", False, "Small settings for a smoke run (CI): --num_samples=20 "
      "--num_perturbed=1500 --base_epochs=15 --head_epochs=15, except those "
      "given.",
      flag_values=flag_values)
  flags.DEFINE_bool(
      "export", True, "Export the dual SavedModel at the end.",
      flag_values=flag_values)


def run(output_dir, num_samples=100, dropout_rate=0.3, num_perturbed=16000,
        base_epochs=60, head_epochs=60, seed=0, export=True, log=print):
  """Runs the chain on digits; returns a dict of results (see keys below).

  Returns:
    dict with "fidelity" (name -> fidelity dict), "paths" (plots, report,
    export), "accuracy", "timings".
  """
  from dropvar_tf._keras import keras
  from dropvar_tf import contract, heads, metrics, moments, targets, training
  from dropvar_tf.study import report
  from dropvar_tf.study.data import images
  from dropvar_tf.study.models import reference

  os.makedirs(output_dir, exist_ok=True)
  keras.utils.set_random_seed(seed)
  timings = {}
  t0 = time.time()
  split = images.load_digits(test_fraction=0.3, seed=seed, flat=True)
  base = reference.image_mlp((64,), 10, hidden=(256, 256),
                             dropout_rate=dropout_rate, seed=seed)
  reference.compile_for_task(base, "multiclass")
  base.fit(split.x_train, split.y_train, epochs=base_epochs, batch_size=64,
           verbose=0)
  accuracy = float(np.mean(
      base.predict(split.x_test, verbose=0).argmax(-1) == split.y_test))
  timings["base_training_s"] = time.time() - t0
  log(f"base model: {len(split.x_train)} train / {len(split.x_test)} test "
      f"digits, dropout {dropout_rate}, test accuracy {accuracy:.3f}")

  t0 = time.time()
  mc = dict(num_samples=num_samples, progress=False)
  t_train = targets.mc_dropout_targets(base, split.x_train, seed=seed, **mc)
  t_test = targets.mc_dropout_targets(base, split.x_test, seed=seed + 1, **mc)
  t_test2 = targets.mc_dropout_targets(base, split.x_test, seed=seed + 2,
                                       **mc)
  timings["mc_targets_s"] = time.time() - t0
  log(f"MC-dropout DPV (T={num_samples}, std of the predicted class's "
      f"probability): mean on train {t_train.mean():.4f}, on test "
      f"{t_test.mean():.4f}")

  t0 = time.time()
  dual = training.train_variation_head(
      base, split.x_train, num_samples=num_samples, seed=seed,
      num_perturbed=num_perturbed, epochs=head_epochs, progress=False)
  timings["head_s"] = time.time() - t0

  out = dual.predict(split.x_test, verbose=0)
  estimate = out[contract.VARIATION_KEY]
  prob = out[contract.PREDICTION_KEY]
  rows = [
      ("variation head (one pass)", metrics.fidelity(estimate, t_test)),
      ("moment propagation (one pass)", metrics.fidelity(
          moments.moment_propagation_variation(base, split.x_test), t_test)),
      ("prediction only: 1 - max prob", metrics.fidelity(
          1.0 - prob.max(-1), t_test)),
      ("noise ceiling: 2nd MC run", metrics.fidelity(t_test2, t_test)),
  ]
  table = report.fidelity_table(rows)
  log("\nFidelity on held-out digits vs MC-dropout DPV:\n" + table)

  paths = {
      "scatter": report.scatter_plot(
          estimate, t_test, os.path.join(output_dir, "scatter.png")),
      "deciles": report.decile_plot(
          {"variation head": estimate,
           "1 - max prob": 1.0 - prob.max(-1)}, t_test,
          os.path.join(output_dir, "deciles.png")),
  }
  dual_path = os.path.join(output_dir, "digits_dual.keras")
  dual.save(dual_path)
  paths["keras_model"] = dual_path
  if export:
    from dropvar_tf import saved_model
    export_base = os.path.join(output_dir, "export", "digits")
    paths["export"] = saved_model.export_saved_model(
        dual, export_base, warmup_examples=split.x_test[:8])
    log(f"\nExported SavedModel: {paths['export']}\nServe it with:\n"
        f"  dropvar_model_server --port=8500 --model_name=digits "
        f"--model_base_path={os.path.abspath(export_base)}\n"
        f"and query it with:\n"
        f"  dropvar_client --target=127.0.0.1:8500 --model_name=digits "
        f"--input=<file.npy>")
  results = {
      "accuracy": accuracy,
      "fidelity": dict(rows),
      "paths": paths,
      "timings": timings,
      "head_metadata": heads.variation_head_metadata(dual),
  }
  report_path = os.path.join(output_dir, "results.json")
  paths["results"] = report_path
  with open(report_path, "w") as f:
    json.dump(results, f, indent=2, default=float)
  log(f"\nPlots: {paths['scatter']}, {paths['deciles']}; "
      f"results: {report_path}")
  return results


def main(argv):
  del argv
  if os.path.exists(FLAGS.output_dir) and not os.path.isdir(FLAGS.output_dir):
    raise app.UsageError(f"--output_dir={FLAGS.output_dir} is a file, not a "
                         "directory.")
  # The terminal shows the job's results, not TF's INFO lines (export) or
  # its tf.function retracing hints (Keras' predict on a few data sizes).
  from dropvar_tf._keras import tf
  tf.get_logger().setLevel("ERROR")
  logging.set_verbosity(logging.WARNING)
  sizes = dict(num_samples=FLAGS.num_samples,
               num_perturbed=FLAGS.num_perturbed,
               base_epochs=FLAGS.base_epochs, head_epochs=FLAGS.head_epochs)
  if FLAGS.quick:
    quick = dict(num_samples=20, num_perturbed=1500, base_epochs=15,
                 head_epochs=15)
    sizes.update({name: value for name, value in quick.items()
                  if not FLAGS[name].present})
  run(output_dir=FLAGS.output_dir, dropout_rate=FLAGS.dropout_rate,
      seed=FLAGS.seed, export=FLAGS.export, **sizes)


def run_main():
  """Console entry point `dropvar`."""
  define_flags()
  cli_help.run(main, __name__, __doc__)


if __name__ == "__main__":
  run_main()
