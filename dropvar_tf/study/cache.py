"""The study's stage cache: base models, MC targets and result rows on disk.

Each stage of a (task, dropout rate) configuration is stored under
`StudyConfig.cache_dir` in one file named
`<task>_r<rate>_<digest><suffix>`, where the digest is a hash of every
setting that changes the stage's output. A changed setting therefore makes a
new file instead of reusing a stale one, and an interrupted study resumes
from the stages it finished. Every write is atomic (`dropvar_tf.atomic`), so
a killed run never leaves a partial file under a final name.

The file names and digests are the cache's format: changing a settings dict
below or `RESULTS_VERSION` orphans every existing cache file of that stage.
"""

import hashlib
import json
import os
import time

import numpy as np

from dropvar_tf import atomic
from dropvar_tf import targets as targets_lib
from dropvar_tf.study import tasks
from dropvar_tf.study.config import CRITEO
from dropvar_tf.study.config import MOVIELENS
from dropvar_tf.study.models import reference

# Bumped when a change in the study or in the head (features, training)
# changes result rows, so that cached rows of an older version are not reused.
RESULTS_VERSION = 5


def _digest(settings):
  text = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_path(config, task, rate, settings, suffix):
  """Path of a cached stage (its folder made), or None without a cache."""
  if not config.cache_dir:
    return None
  os.makedirs(config.cache_dir, exist_ok=True)
  return os.path.join(config.cache_dir,
                      f"{task}_r{rate}_{_digest(settings)}{suffix}")


def _base_settings(task, rate, config):
  return {"task": task, "rate": rate, "seed": config.seed,
          "epochs": config.base_epochs[task], "max_train": config.max_train,
          "criteo": (config.criteo_rows, config.criteo_buckets)
                    if task == CRITEO else None}


def _target_settings(task, rate, config):
  return dict(_base_settings(task, rate, config),
              num_samples=config.num_samples, max_test=config.max_test,
              num_perturbed=config.num_perturbed,
              noise=config.perturb_noise, swap=config.perturb_swap)


def base_model_path(task, rate, config):
  """Path of the cached base-model weights; None without a cache.

  Side effect: creates `config.cache_dir` (as do the other `*_path`s).
  """
  return _cache_path(config, task, rate, _base_settings(task, rate, config),
                     ".weights.h5")


def targets_path(task, rate, config):
  """Path of the cached MC targets (`mc_targets`); None without a cache."""
  return _cache_path(config, task, rate, _target_settings(task, rate, config),
                     "_targets.npz")


def reference_path(task, rate, config):
  """Path of the cached reference targets; None without a cache."""
  settings = dict(_target_settings(task, rate, config),
                  reference_samples=config.reference_samples)
  return _cache_path(config, task, rate, settings, "_reference.npy")


def rows_path(task, rate, config):
  """Path of a configuration's cached result rows; None without a cache."""
  settings = dict(_target_settings(task, rate, config),
                  version=RESULTS_VERSION, head_epochs=config.head_epochs,
                  head_batch_size=config.head_batch_size,
                  sweep=rate in config.sweep_rates,
                  timing_rows=config.timing_rows,
                  reference_samples=config.reference_samples)
  return _cache_path(config, task, rate, settings, "_rows.json")


def trained_base_model(task, split, rate, config, log=print):
  """Builds and trains the base model, or loads its cached weights.

  Args:
    task: one of `config.TASKS`.
    split: the task's `Split`.
    rate: the dropout rate.
    config: a `StudyConfig`.
    log: a print-like function for progress lines.

  Returns:
    (model, training seconds; 0.0 when loaded from the cache). The model is
    compiled.

  Side effect: writes the trained weights to the cache, if there is one.
  """
  model = tasks.build_base_model(task, split, rate, config.seed)
  path = base_model_path(task, rate, config)
  if path and os.path.exists(path):
    reference.compile_for_task(model, split.info["kind"])
    model.load_weights(path)
    return model, 0.0
  t0 = time.time()
  reference.train_base_model(model, split, epochs=config.base_epochs[task],
                             batch_size=256 if task in (MOVIELENS, CRITEO)
                             else 64, seed=config.seed, validate=False)
  seconds = time.time() - t0
  log(f"  trained base model in {seconds:.0f} s")
  if path:
    with atomic.atomic_path(path) as tmp:
      model.save_weights(tmp)
  return model, seconds


def mc_targets(task, model, fit_x, split, rate, config, log=print):
  """MC-dropout DPV on calibration and test inputs, cached.

  The calibration targets use `seed` (as `train_variation_head` does), the
  test targets `seed + 1` and, for the noise ceiling, `seed + 2`.

  Args:
    task: the task name.
    model: the trained base model.
    fit_x: the calibration inputs (`tasks.calibration_inputs`).
    split: the task's `Split`.
    rate: the dropout rate.
    config: a `StudyConfig`.
    log: a print-like function for progress lines.

  Returns:
    dict with "fit", "test", "test2" float32 arrays.

  Side effect: writes the targets to the cache, if there is one.
  """
  path = targets_path(task, rate, config)
  if path and os.path.exists(path):
    with np.load(path) as stored:
      return {k: stored[k] for k in ("fit", "test", "test2")}
  t0 = time.time()
  mc = dict(num_samples=config.num_samples, progress=False)
  out = {
      "fit": targets_lib.mc_dropout_targets(model, fit_x, seed=config.seed,
                                            **mc),
      "test": targets_lib.mc_dropout_targets(model, split.x_test,
                                             seed=config.seed + 1, **mc),
      "test2": targets_lib.mc_dropout_targets(model, split.x_test,
                                              seed=config.seed + 2, **mc),
  }
  log(f"  MC targets (T={config.num_samples}) in {time.time() - t0:.0f} s")
  if path:
    with atomic.atomic_path(path) as tmp:
      np.savez(tmp, **out)
  return out


def reference_targets(task, model, split, rate, config, log=print):
  """High-T MC DPV of the test split (seed + 3), cached; None when disabled.

  T=100 targets carry sampling noise (the noise ceiling measures it); scores
  against `reference_samples` passes tell how close an estimator is to the
  DPV itself rather than to one noisy draw of it.

  Args:
    task: the task name.
    model: the trained base model.
    split: the task's `Split`.
    rate: the dropout rate.
    config: a `StudyConfig`; `config.reference_samples` = 0 disables it.
    log: a print-like function for progress lines.

  Returns:
    A float32 array with one DPV per test example, or None.

  Side effect: writes the targets to the cache, if there is one.
  """
  if not config.reference_samples:
    return None
  path = reference_path(task, rate, config)
  if path and os.path.exists(path):
    return np.load(path)
  t0 = time.time()
  ref = targets_lib.mc_dropout_targets(
      model, split.x_test, num_samples=config.reference_samples,
      seed=config.seed + 3, progress=False)
  log(f"  reference MC targets (T={config.reference_samples}) in "
      f"{time.time() - t0:.0f} s")
  if path:
    with atomic.atomic_path(path) as tmp:
      np.save(tmp, ref)
  return ref


def read_rows(path):
  """Reads result rows stored by `write_rows`: (rows, info)."""
  with open(path) as f:
    stored = json.load(f)
  return stored["rows"], stored["info"]


def write_rows(path, rows, info):
  """Stores a configuration's result rows and context at `path`, atomically."""
  atomic.atomic_write(path, json.dumps({"rows": rows, "info": info}))
