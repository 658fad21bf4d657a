"""Inference cost per example: one compiled pass, and T-pass MC dropout.

Both take the best of a few repeats after a warm-up call, so tracing and
first-call allocation do not count. Timings on a shared CPU vary from run
to run: compare ratios within one run, not absolute values across runs.
"""

import time

from dropvar_tf._keras import tf
from dropvar_tf import targets as targets_lib
from dropvar_tf import training


def _compiled_call(model, x):
  fn = tf.function(lambda inputs: model(inputs, training=False))
  tensors = tf.nest.map_structure(tf.convert_to_tensor, x)
  return fn, tensors


def one_pass_seconds(model, x, repeats=5):
  """Seconds per example of one compiled inference call on the rows `x`."""
  fn, tensors = _compiled_call(model, x)
  tf.nest.map_structure(lambda t: t.numpy(), fn(tensors))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), fn(tensors))
    best = min(best, time.perf_counter() - t0)
  return best / training.num_examples(x)


def mc_seconds(model, x, num_samples, repeats=2):
  """Seconds per example of T-pass `mc_dropout_targets` on the rows `x`."""
  mc = dict(num_samples=num_samples, progress=False)
  targets_lib.mc_dropout_targets(model, x, seed=12345, **mc)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    targets_lib.mc_dropout_targets(model, x, seed=12345, **mc)
    best = min(best, time.perf_counter() - t0)
  return best / training.num_examples(x)
