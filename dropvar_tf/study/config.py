"""Settings of a study run: the tasks, dropout rates and every count.

`StudyConfig()` is the full study, `small_config()` a tiny one for tests and
smoke runs; `check_config` validates either before a run.
"""

import dataclasses

from dropvar_tf import validation

MOVIELENS = "movielens"
CRITEO = "criteo"
DIGITS = "digits"
MNIST = "mnist"
TASKS = (MOVIELENS, CRITEO, DIGITS, MNIST)
DROPOUT_RATES = (0.1, 0.3, 0.5)
# The rate the issue sets its targets at (`checks.TARGETS`), where every
# feature set is fitted.
TARGET_RATE = 0.3


@dataclasses.dataclass
class StudyConfig:
  """Settings of one study run.

  Attributes:
    tasks: task names, a subset of `TASKS`.
    dropout_rates: dropout rates of the base models.
    sweep_rates: rates at which every feature set is fitted; at the other
      rates only the recommended head and the baselines are.
    num_samples: T, stochastic passes per MC target.
    num_perturbed: calibration inputs (perturbed training inputs).
    perturb_noise: float-feature noise of the perturbation.
    perturb_swap: integer-feature swap probability of the perturbation.
    head_epochs: maximum head (and baseline regressor) training epochs.
    head_batch_size: head training batch size.
    base_epochs: dict task -> base-model training epochs.
    criteo_rows: rows of the synthetic Criteo-like data.
    criteo_buckets: hash buckets per Criteo categorical column.
    max_train: cap on training rows per task (None: all).
    max_test: cap on test rows per task (None: all).
    timing_rows: rows used to time one-pass and MC inference.
    reference_samples: T of a second, less noisy scoring target on the test
      split (0: none).
    seed: global seed (data split, models, perturbation, masks, heads).
    cache_dir: where base models, targets and result rows are cached (None:
      no cache).
    label: a name for the run shown in the report ("full" or "small").
  """
  tasks: tuple = TASKS
  dropout_rates: tuple = DROPOUT_RATES
  sweep_rates: tuple = (TARGET_RATE,)
  num_samples: int = 100
  num_perturbed: int = 16000
  perturb_noise: float = 0.5
  perturb_swap: float = 0.3
  head_epochs: int = 60
  head_batch_size: int = 64
  base_epochs: dict = dataclasses.field(default_factory=lambda: {
      MOVIELENS: 8, CRITEO: 4, DIGITS: 60, MNIST: 30})
  criteo_rows: int = 50_000
  criteo_buckets: int = 2000
  max_train: int = None
  max_test: int = 10_000
  timing_rows: int = 1024
  reference_samples: int = 1000
  seed: int = 0
  cache_dir: str = None
  label: str = "full"


def small_config(cache_dir=None, tasks=(DIGITS, CRITEO)):
  """Returns a `StudyConfig` for tests and smoke runs.

  Tiny data, T=10, one dropout rate, few epochs: it checks the machinery,
  its numbers mean nothing.

  Args:
    cache_dir: the cache folder (None: no cache).
    tasks: task names, a subset of `TASKS`.

  Returns:
    A `StudyConfig` labelled "small".
  """
  return StudyConfig(
      tasks=tuple(tasks), dropout_rates=(TARGET_RATE,),
      sweep_rates=(TARGET_RATE,), num_samples=10, num_perturbed=400,
      head_epochs=3, head_batch_size=64,
      base_epochs={MOVIELENS: 1, CRITEO: 1, DIGITS: 3, MNIST: 2},
      criteo_rows=1200, criteo_buckets=50, max_train=600, max_test=200,
      timing_rows=128, reference_samples=20, cache_dir=cache_dir,
      label="small")


def check_config(config):
  """Validates a `StudyConfig`.

  Args:
    config: the `StudyConfig` to check.

  Returns:
    `config`, unchanged.

  Raises:
    ValueError: not a `StudyConfig`, an unknown task, a rate outside (0, 1),
      a bad count, or a task without base epochs.
  """
  if not isinstance(config, StudyConfig):
    raise validation.invalid("config", "a `StudyConfig`",
                             type(config).__name__)
  if not config.tasks or any(t not in TASKS for t in config.tasks):
    raise validation.invalid("tasks", f"a non-empty subset of {TASKS}",
                             config.tasks)
  rates = tuple(config.dropout_rates)
  if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float))
                      or not 0.0 < r < 1.0 for r in rates):
    raise validation.invalid("dropout_rates",
                             "a non-empty list of floats in (0, 1)", rates)
  validation.check_int(config.num_samples, "num_samples", 2)
  validation.check_int(config.num_perturbed, "num_perturbed", 10)
  validation.check_int(config.head_epochs, "head_epochs", 1)
  validation.check_int(config.timing_rows, "timing_rows", 1)
  missing = [t for t in config.tasks if t not in config.base_epochs]
  if missing:
    raise validation.invalid("base_epochs", "epochs for every task",
                             config.base_epochs)
  return config
