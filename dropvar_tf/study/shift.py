"""Off the calibration distribution: estimates on shifted inputs.

`run_shift_study` fits the library's default head (with its analytic prior,
`add_variation_head(prior="auto")`) and the same head without a prior on
each task's calibration inputs (as the fidelity study does), then scores
them, moment propagation and the prediction-only closed form on inputs no
head was fitted on:

- digits: the test images as trained (pixels / 16), scaled x2 and x4,
  unscaled (0..16), uniform noise, the images plus Gaussian noise of std 0.3,
  inverted (1 - x), blank, and MNIST-5k digits downsampled to 8x8 (another
  dataset);
- MNIST-5k: the same shifts of its test images (pixels / 255; unscaled is
  0..255), with scikit-learn digits upsampled to 28x28 as the other dataset;
- MovieLens-100k: the test ratings as trained, user and movie ids swapped
  between rows, user ids or movie ids never seen in training, and blank rows
  (both ids 0). Its model has no dense or side features to scale, and its
  only spare embedding row is the out-of-vocabulary id 0 unless training
  rows were capped (`StudyConfig.max_train`), so with all training rows an
  unseen id is id 0;
- Criteo-like: the test rows as trained, dense features scaled x2, x4 and
  x16, sign-flipped and with Gaussian noise, blank rows, categorical ids
  swapped between rows and ids never seen in training.

Each row compares an estimator's mean with the mean MC-dropout DPV of the
same inputs (T = `config.num_samples`), its Spearman correlation with it,
and the share of exact zeros where the MC DPV is at least 1e-3. The goals of
issue 12 (`shift_checks`): on every shift the ratio of means within
[0.5, 2] and no exact zeros; Spearman >= 0.85 pooled over all shifts.

The default head is fitted with `out_of_range=True`: `out_of_range_rows`
says per shift how well that signal separates the shifted inputs from the
in-distribution test inputs (AUC), and which share of them it flags above
the threshold read on held-out calibration inputs (the 99th percentile the
fit records). `write_shift_report` writes shift.md, shift.json and
shift.png.
"""

import json
import os
import time
import warnings

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import moments
from dropvar_tf import targets as targets_lib
from dropvar_tf import training
from dropvar_tf import validation
from dropvar_tf.study import cache
from dropvar_tf.study import estimators
from dropvar_tf.study import tasks
from dropvar_tf.study.config import CRITEO
from dropvar_tf.study.config import DIGITS
from dropvar_tf.study.config import MNIST
from dropvar_tf.study.config import MOVIELENS
from dropvar_tf.study.data.movielens import MOVIE_KEY
from dropvar_tf.study.data.movielens import USER_KEY

SHIFT_TASKS = (DIGITS, MNIST, MOVIELENS, CRITEO)
# Test rows per shift.
NUM_ROWS = 300
# The goals.
MIN_RATIO, MAX_RATIO = 0.5, 2.0
MIN_POOLED_SPEARMAN = 0.85
# MC DPV at or above this must not be estimated as exactly 0.
ZERO_DPV = 1e-3

HEAD = "variation head"
HEAD_WITHOUT_PRIOR = "head without prior"
MOMENTS = "moment propagation"
PREDICTION = "prediction only"
IN_DISTRIBUTION = "as trained"
ESTIMATORS = (HEAD, HEAD_WITHOUT_PRIOR, MOMENTS, PREDICTION)


def mnist_as_digits(num, seed=0):
  """MNIST-5k digits shrunk to the digits task's 8x8 pixels in [0, 1].

  Area-averaged from 28x28 to 8x8 and rescaled so that each image's
  brightest pixel is 1, as the digits' bright strokes are.

  Returns:
    float32 (num, 64).
  """
  from dropvar_tf.study import data
  split = data.load_mnist_5k(seed=seed)
  images = split.x_test[:num]
  small = tf.image.resize(images, (8, 8), method="area").numpy()
  small /= np.maximum(small.max(axis=(1, 2, 3), keepdims=True), 1e-6)
  return small.reshape(len(small), 64).astype("float32")


def digits_as_mnist(num, seed=0):
  """scikit-learn digits grown to MNIST-5k's 28x28 pixels in [0, 1].

  Each 8x8 digit is resized (bilinear) to 20x20 and centred in a 28x28 frame,
  as MNIST centres its digits in a 20x20 box, then rescaled so that its
  brightest pixel is 1.

  Returns:
    float32 (num, 784); `num` at most 1,797 (the digits there are).
  """
  from dropvar_tf.study import data
  split = data.load_digits(seed=seed)
  images = np.concatenate([split.x_test, split.x_train])[:num]
  big = tf.image.resize(images, (20, 20), method="bilinear").numpy()
  big = np.pad(np.clip(big, 0.0, None), ((0, 0), (4, 4), (4, 4), (0, 0)))
  big /= np.maximum(big.max(axis=(1, 2, 3), keepdims=True), 1e-6)
  return big.reshape(len(big), 28 * 28).astype("float32")


def _image_shifts(x, other, unscaled, other_name, seed):
  """Shifts of flat images in [0, 1]: dict name -> (N, D) float32."""
  rng = np.random.default_rng([seed, 12])
  x = np.asarray(x, "float32")
  return {
      IN_DISTRIBUTION: x,
      "scale x2": 2.0 * x,
      "scale x4": 4.0 * x,
      f"unscaled (0-{unscaled})": float(unscaled) * x,
      "uniform noise": rng.uniform(size=x.shape).astype("float32"),
      "Gaussian noise 0.3": (x + rng.normal(0.0, 0.3, x.shape)).astype(
          "float32"),
      "inverted (1 - x)": 1.0 - x,
      "blank": np.zeros_like(x),
      other_name: np.asarray(other, "float32"),
  }


def digit_shifts(x, other, seed=0):
  """The digits shifts of the module docstring: dict name -> (N, 64)."""
  return _image_shifts(x, other, 16, "MNIST 8x8 (other dataset)", seed)


def mnist_shifts(x, other, seed=0):
  """The MNIST-5k shifts of the module docstring: dict name -> (N, 784)."""
  return _image_shifts(x, other, 255, "digits 28x28 (other dataset)", seed)


def unseen_ids(ids, train_ids, vocab_size, rng):
  """Ids drawn from [0, vocab_size) minus those in `train_ids`.

  Args:
    ids: int array (N,), the ids to replace (gives shape and dtype).
    train_ids: the ids seen in training.
    vocab_size: the id range of the embedding table.
    rng: a numpy Generator.

  Returns:
    (N,) ids, none of them in `train_ids`; `ids` unchanged when every id is
    seen in training.
  """
  pool = np.setdiff1d(np.arange(vocab_size), train_ids)
  if not pool.size:
    return np.asarray(ids).copy()
  return rng.choice(pool, size=len(ids)).astype(np.asarray(ids).dtype)


def movielens_shifts(x, x_train, vocab_sizes, seed=0):
  """The MovieLens shifts of the module docstring: dict name -> inputs.

  Args:
    x: {"user_id": int (N,), "movie_id": int (N,)}, the test rows.
    x_train: the same layout, the training rows.
    vocab_sizes: dict input name -> embedding rows (`info["vocab_sizes"]`).
    seed: seed of the permutations and draws.

  Returns:
    dict name -> {"user_id", "movie_id"} of N rows each, dtypes kept.
  """
  rng = np.random.default_rng([seed, 12])
  x = {k: np.asarray(v) for k, v in x.items()}
  swapped = {k: rng.permutation(v) for k, v in x.items()}
  unseen = {k: unseen_ids(v, x_train[k], vocab_sizes[k], rng)
            for k, v in x.items()}
  return {
      IN_DISTRIBUTION: x,
      "swapped ids": swapped,
      "unseen user ids": {USER_KEY: unseen[USER_KEY], MOVIE_KEY: x[MOVIE_KEY]},
      "unseen movie ids": {USER_KEY: x[USER_KEY],
                           MOVIE_KEY: unseen[MOVIE_KEY]},
      "blank (ids 0)": {k: np.zeros_like(v) for k, v in x.items()},
  }


def criteo_shifts(x, x_train, num_buckets, seed=0):
  """The Criteo-like shifts of the module docstring: dict name -> inputs."""
  rng = np.random.default_rng([seed, 12])
  dense, cat = np.asarray(x["dense"], "float32"), np.asarray(x["cat"])
  buckets = np.broadcast_to(np.asarray(num_buckets), (cat.shape[1],))
  swapped = np.stack([rng.permutation(cat[:, j]) for j in
                      range(cat.shape[1])], axis=1)
  unseen = np.stack([unseen_ids(cat[:, j], x_train["cat"][:, j], buckets[j],
                                rng) for j in range(cat.shape[1])], axis=1)

  def rows(d, c=cat):
    return {"dense": d.astype("float32"), "cat": c.astype(cat.dtype)}

  return {
      IN_DISTRIBUTION: rows(dense),
      "dense x2": rows(2.0 * dense),
      "dense x4": rows(4.0 * dense),
      "dense x16": rows(16.0 * dense),
      "dense sign flip": rows(-dense),
      "dense Gaussian noise": rows(dense + rng.normal(
          0.0, 1.0, dense.shape) * dense.std(axis=0)),
      "blank": rows(np.zeros_like(dense), np.zeros_like(cat)),
      "swapped ids": rows(dense, swapped),
      "unseen ids": rows(dense, unseen),
  }


def _estimators(kind, model, duals):
  """name -> function(x) -> one estimate per example (or None)."""
  try:
    moment_net = moments.moment_model(model)
  except ValueError:
    moment_net = None

  def head(dual):
    return lambda x: dual.predict(x, batch_size=1024, verbose=0)[
        contract.VARIATION_KEY]

  def moment(x):
    if moment_net is None:
      return None
    return moment_net.predict(x, batch_size=1024, verbose=0)

  fns = {name: head(dual) for name, dual in duals.items()}
  fns.update({MOMENTS: moment,
              PREDICTION: lambda x: estimators.closed_form_estimate(
                  kind, model, x)})
  return fns


def _spearman(estimate, target):
  from scipy import stats
  if np.ptp(estimate) == 0 or np.ptp(target) == 0:
    return None
  return float(stats.spearmanr(estimate, target)[0])


def score_shifts(kind, model, duals, shifts, num_samples, seed):
  """Scores each estimator on each shift against MC-dropout DPV.

  Args:
    kind: the task kind (for the prediction-only closed form).
    model: the base model.
    duals: dict estimator name -> a dual model of `model`, head fitted.
    shifts: dict name -> inputs.
    num_samples: T of the MC targets.
    seed: seed of the MC masks.

  Returns:
    (rows, pooled): rows are dicts (shift, estimator, estimate_mean,
    mc_mean, ratio, spearman, zero_share, n); pooled maps each estimator to
    its Spearman over all shifts together.
  """
  rows = []
  pooled = {}
  fns = _estimators(kind, model, duals)
  for shift, x in shifts.items():
    mc = np.asarray(targets_lib.mc_dropout_targets(
        model, x, num_samples=num_samples, seed=seed, progress=False),
                    "float64").ravel()
    for name, fn in fns.items():
      est = fn(x)
      if est is None:
        continue
      est = np.asarray(est, "float64").ravel()
      pooled.setdefault(name, ([], []))
      pooled[name][0].append(est)
      pooled[name][1].append(mc)
      big = mc >= ZERO_DPV
      rows.append({
          "shift": shift, "estimator": name,
          "estimate_mean": float(est.mean()), "mc_mean": float(mc.mean()),
          "ratio": float(est.mean() / mc.mean()) if mc.mean() > 0 else None,
          "spearman": _spearman(est, mc),
          "zero_share": float(np.mean(est[big] == 0)) if big.any() else 0.0,
          "n": int(len(mc)),
      })
  return rows, {name: _spearman(np.concatenate(e), np.concatenate(t))
                for name, (e, t) in pooled.items()}


def auc(negatives, positives):
  """P(a positive scores above a negative), ties counted half (Mann-Whitney).

  Returns:
    A float in [0, 1], or None when either side is empty.
  """
  from scipy import stats
  negatives = np.asarray(negatives, "float64").ravel()
  positives = np.asarray(positives, "float64").ravel()
  if not len(negatives) or not len(positives):
    return None
  ranks = stats.rankdata(np.concatenate([positives, negatives]))
  n = len(positives)
  return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * len(negatives)))


def out_of_range_threshold(dual):
  """The flagging threshold: the held-out 99th percentile the fit recorded.

  Returns:
    A float, or None when the head was fitted without a report split.
  """
  record = heads.variation_head_metadata(dual).get("out_of_range") or {}
  return (record.get("held_out") or {}).get("quantile_99")


def out_of_range_rows(dual, shifts, threshold):
  """How the dual's "out_of_range" signal separates each shift.

  Args:
    dual: a dual made with `out_of_range=True`, fitted.
    shifts: dict name -> inputs; IN_DISTRIBUTION is the reference.
    threshold: inputs whose signal exceeds it are flagged (None: no share).

  Returns:
    Rows (shift, auc against IN_DISTRIBUTION (None for it), flagged share,
    median signal, n).
  """
  signals = {name: np.asarray(dual.predict(x, batch_size=1024, verbose=0)[
      contract.OUT_OF_RANGE_KEY], "float64") for name, x in shifts.items()}
  reference = signals[IN_DISTRIBUTION]
  return [{"shift": name,
           "auc": None if name == IN_DISTRIBUTION else auc(reference, signal),
           "flagged": (None if threshold is None else
                       float(np.mean(signal > threshold))),
           "median": float(np.median(signal)), "n": int(len(signal))}
          for name, signal in signals.items()]


def out_of_range_table(rows):
  """Markdown: one line per shift, AUC / flagged share / median signal."""
  lines = ["| inputs | AUC vs as trained | flagged | median signal |",
           "|---|---:|---:|---:|"]
  for r in rows:
    flagged = "n/a" if r["flagged"] is None else f"{100 * r['flagged']:.0f}%"
    lines.append(f"| {r['shift']} | {_fmt(r['auc'])} | {flagged} | "
                 f"{_fmt(r['median'], 2)} |")
  return "\n".join(lines)


def shift_checks(rows, pooled, estimator=HEAD):
  """The issue's goals for one estimator: list of (goal, value, passed)."""
  mine = [r for r in rows if r["estimator"] == estimator]
  zeros = max(r["zero_share"] for r in mine)
  outside = [r["shift"] for r in mine if r["ratio"] is not None and
             not MIN_RATIO <= r["ratio"] <= MAX_RATIO]
  return [
      (f"ratio of means in [{MIN_RATIO}, {MAX_RATIO}] on every shift",
       ", ".join(outside) if outside else "all", not outside),
      (f"no exact 0 where MC DPV >= {ZERO_DPV}", f"max share {zeros:.3f}",
       zeros == 0),
      (f"pooled Spearman >= {MIN_POOLED_SPEARMAN}", pooled.get(estimator),
       (pooled.get(estimator) or 0.0) >= MIN_POOLED_SPEARMAN),
  ]


def fit_default_head(task, model, split, rate, config, log=print,
                     **head_kwargs):
  """The library's default head fitted on the task's calibration inputs.

  `head_kwargs` go to `add_variation_head` (e.g. `prior=None`).
  """
  fit_x = tasks.calibration_inputs(split, config)
  t = cache.mc_targets(task, model, fit_x, split, rate, config, log)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dual = heads.add_variation_head(model, seed=config.seed, **head_kwargs)
    training.fit_variation_head(
        dual, fit_x, t["fit"], epochs=config.head_epochs,
        batch_size=config.head_batch_size, seed=config.seed,
        num_samples=config.num_samples)
  return dual


def task_shifts(task, x, split, seed):
  """The shifts of one task's test rows `x`: dict name -> inputs.

  Args:
    task: one of `SHIFT_TASKS`.
    x: test rows of `split`.
    split: the task's `Split` (training ids, vocabulary sizes).
    seed: seed of the shifts (and of the other dataset's split).

  Returns:
    dict name -> inputs in the layout of `x`, IN_DISTRIBUTION first.

  Raises:
    ValueError: a task not in `SHIFT_TASKS`.
  """
  if task == DIGITS:
    return digit_shifts(x, mnist_as_digits(_rows(x), seed), seed)
  if task == MNIST:
    return mnist_shifts(x, digits_as_mnist(_rows(x), seed), seed)
  if task == MOVIELENS:
    return movielens_shifts(x, split.x_train, split.info["vocab_sizes"], seed)
  if task == CRITEO:
    return criteo_shifts(x, split.x_train, split.info["num_buckets"], seed)
  raise validation.invalid("task", f"one of {SHIFT_TASKS}", task)


def task_note(task, split):
  """A sentence on what a task's shifts can and cannot be, or None."""
  if task != MOVIELENS:
    return None
  sizes = split.info["vocab_sizes"]
  unseen = {k: np.setdiff1d(np.arange(v), split.x_train[k]).size
            for k, v in sizes.items()}
  return (
      "The model's inputs are a user id and a movie id, embedded; it has no "
      "dense or side features to scale or flip. Unseen ids are drawn from "
      "the embedding rows no training row uses: here "
      f"{unseen[USER_KEY]} of {sizes[USER_KEY]} user and "
      f"{unseen[MOVIE_KEY]} of {sizes[MOVIE_KEY]} movie rows. With all "
      "training rows that is the out-of-vocabulary id 0 alone (the loader "
      "maps ids it has not seen in training to 0), and \"blank (ids 0)\" "
      "is both ids unseen.")


def _rows(x):
  """Number of rows of an array or of a dict of arrays."""
  return len(next(iter(x.values())) if isinstance(x, dict) else x)


def run_shift_study(config, output_dir, rate=0.3, log=print):
  """Runs the shift study for the tasks of `config` it covers.

  Args:
    config: a `StudyConfig`; its tasks among `SHIFT_TASKS` are run.
    output_dir: folder for shift.md, shift.json and shift.png.
    rate: the dropout rate of the base models.
    log: a print-like function for progress lines.

  Returns:
    dict with "tasks" (task -> data, note (`task_note`), rows, pooled,
    checks, head metadata, out_of_range (threshold and
    `out_of_range_rows`), seconds) and "paths".

  Side effects: reads and writes the study cache; writes the report.
  """
  results = {}
  for task in [t for t in config.tasks if t in SHIFT_TASKS]:
    t0 = time.time()
    keras.utils.set_random_seed(config.seed)
    split, _, data_full = tasks.load_task(task, config)
    log(f"shift study, {task}: {data_full}")
    model, _ = cache.trained_base_model(task, split, rate, config, log)
    duals = {HEAD: fit_default_head(task, model, split, rate, config, log,
                                    out_of_range=True),
             HEAD_WITHOUT_PRIOR: fit_default_head(task, model, split, rate,
                                                  config, log, prior=None)}
    n = min(NUM_ROWS, len(split.y_test))
    x = tasks.common.take(split.x_test, np.arange(n))
    shifts = task_shifts(task, x, split, config.seed)
    rows, pooled = score_shifts(split.info["kind"], model, duals, shifts,
                                config.num_samples, config.seed + 3)
    threshold = out_of_range_threshold(duals[HEAD])
    results[task] = {
        "out_of_range": {"threshold": threshold,
                         "rows": out_of_range_rows(duals[HEAD], shifts,
                                                   threshold)},
        "data": data_full, "note": task_note(task, split), "rows": rows,
        "pooled": pooled,
        "checks": shift_checks(rows, pooled),
        "head": heads.variation_head_metadata(duals[HEAD]),
        "seconds": time.time() - t0,
    }
    log(f"  pooled Spearman: {pooled}")
  paths = write_shift_report(results, config, output_dir)
  return {"tasks": results, "paths": paths}


def _fmt(value, digits=3):
  if value is None:
    return "n/a"
  if isinstance(value, str):
    return value
  return f"{value:.{digits}f}"


def shift_table(rows, estimator_names):
  """Markdown: one line per shift, ratio / Spearman / zeros per estimator."""
  shifts = list(dict.fromkeys(r["shift"] for r in rows))
  by = {(r["shift"], r["estimator"]): r for r in rows}
  header = ["inputs", "MC mean"] + list(estimator_names)
  lines = ["| " + " | ".join(header) + " |",
           "|---|" + "---:|" * (len(header) - 1)]
  for shift in shifts:
    mc = next(r["mc_mean"] for r in rows if r["shift"] == shift)
    cells = [shift, _fmt(mc, 4)]
    for name in estimator_names:
      r = by.get((shift, name))
      cells.append("unsupported" if r is None else
                   f"{_fmt(r['ratio'], 2)} / {_fmt(r['spearman'])} / "
                   f"{100 * r['zero_share']:.0f}%")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plot(results, path):
  """Bars of the ratio of means, one panel per task, one colour per estimator.

  An estimator a task does not support leaves its slot empty, so colours
  and positions match across panels.
  """
  # `report` selects matplotlib's Agg backend before pyplot is imported.
  from dropvar_tf.study import report  # noqa: F401
  import matplotlib.pyplot as plt
  cols = min(2, len(results))
  rows = -(-len(results) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows),
                           squeeze=False)
  for ax in axes.ravel()[len(results):]:
    ax.set_visible(False)
  names = list(ESTIMATORS) + list(dict.fromkeys(
      r["estimator"] for res in results.values() for r in res["rows"]
      if r["estimator"] not in ESTIMATORS))
  colors = {name: f"C{i}" for i, name in enumerate(names)}
  width = 0.8 / len(names)
  handles = {}
  for ax, (task, res) in zip(axes.ravel(), results.items()):
    shifts = list(dict.fromkeys(r["shift"] for r in res["rows"]))
    by = {(r["shift"], r["estimator"]): r for r in res["rows"]}
    # A ratio of 0 (every estimate 0) is drawn at the panel's floor.
    ratios = {name: np.array([by.get((s, name), {}).get("ratio", np.nan)
                              for s in shifts], "float64") for name in names}
    seen = np.concatenate(list(ratios.values()))
    seen = seen[np.isfinite(seen) & (seen > 0)]
    low = min(MIN_RATIO, seen.min() if seen.size else MIN_RATIO) / 2
    high = max(MAX_RATIO, seen.max() if seen.size else MAX_RATIO) * 2
    for i, name in enumerate(names):
      handles[name] = ax.bar(np.arange(len(shifts)) + i * width,
                             np.maximum(ratios[name], low), width,
                             color=colors[name], label=name)
    handles["goal"] = ax.axhspan(MIN_RATIO, MAX_RATIO, color="green",
                                 alpha=0.12,
                                 label=f"goal [{MIN_RATIO}, {MAX_RATIO}]")
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.set_xticks(np.arange(len(shifts)) + 0.4 - width / 2)
    ax.set_xticklabels(shifts, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("mean estimate / mean MC DPV")
    ax.set_title(task)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  fig.legend(list(handles.values()), [h.get_label() for h in
                                      handles.values()],
             loc="upper center", ncol=len(handles), fontsize=8)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def _out_of_range_section(oor):
  """Report lines on the default head's "out_of_range" signal."""
  threshold = oor.get("threshold")
  return [
      "Out-of-range signal of the variation head "
      "(`add_variation_head(out_of_range=True)`): how far an input's "
      "activation strengths lie outside their range on the calibration "
      "inputs, in half-widths of that range (0 inside). AUC: the "
      "chance that a row of that shift reads higher than a row as trained "
      "(ties half; 0.5 is no separation). Flagged: the share of rows above "
      "the 99th percentile of the signal on held-out calibration inputs ("
      + (f"{threshold:.3g}" if threshold is not None else "n/a") +
      "), the threshold `fit_variation_head` records for a server.", "",
      out_of_range_table(oor["rows"]), ""]


def write_shift_report(results, config, output_dir):
  """Writes shift.md, shift.json and shift.png to `output_dir`.

  Returns:
    dict name -> path.
  """
  os.makedirs(output_dir, exist_ok=True)
  paths = {"plot": _plot(results, os.path.join(output_dir, "shift.png"))}
  lines = [
      "# Off the calibration distribution: estimates on shifted inputs",
      "",
      "Generated by `python -m dropvar_tf.study.cli --shift --tasks="
      f"{','.join(results)} --output_dir=docs` ({config.label} mode) on a "
      "shared 2-core CPU machine. Each task's base model (dropout 0.3) and "
      "calibration targets come from the fidelity study's stage cache; on "
      f"them ({config.num_perturbed} perturbed training inputs labelled with "
      f"MC DPV of T = {config.num_samples}) two heads are fitted: the "
      "default (`add_variation_head(model)`: prior \"auto\", which is the "
      "output delta on these models (for probability outputs smoothed, "
      "and seeing each Dropout of the MLP), its correction shrinking "
      "toward its calibration mean as inputs leave the calibration range; "
      "built with `out_of_range=True`, which adds that signal as an output "
      "and leaves the estimates as they are) and the same "
      "with `prior=None` (the default before issue 12). Every row has the "
      f"first {NUM_ROWS} test rows, shifted; MC DPV of T = "
      f"{config.num_samples} (seed + 3) on exactly those inputs is the "
      "reference. No shift was among any head's calibration inputs. Each "
      "cell is `ratio / Spearman / zeros`: mean estimate / mean MC DPV, "
      "Spearman correlation with MC DPV, and the share of exact-0 estimates "
      f"where MC DPV >= {ZERO_DPV}. \"prediction only\" is 1 - max prob "
      "(classes) or p(1 - p) (binary): a score, not a DPV, so its ratio "
      "says little; its Spearman is the baseline.",
      "",
  ]
  for task, res in results.items():
    names = list(dict.fromkeys(r["estimator"] for r in res["rows"]))
    missing = "" if MOMENTS in names else (
        f" {MOMENTS.capitalize()} does not support this model (see "
        "`moments.moment_model`): the head's prior is the output-delta "
        "feature.")
    if PREDICTION not in names:
      missing += (f" No {PREDICTION} baseline: the output of a regression "
                  "alone says nothing of its spread.")
    names = list(ESTIMATORS) + [n for n in names if n not in ESTIMATORS]
    note = res.get("note")
    lines += [f"## {task}", "", res["data"] + "." + missing, ""]
    lines += [note, ""] if note else []
    lines += [shift_table(res["rows"], names), "",
              "Pooled Spearman over all rows: " + ", ".join(
                  f"{n} {_fmt(v)}" for n, v in res["pooled"].items()) + ".",
              "", "Goals (variation head):", "",
              "| goal | value | met |", "|---|---|---|"]
    lines += [f"| {g} | {_fmt(v)} | {'yes' if ok else 'NO'} |"
              for g, v, ok in res["checks"]]
    head = res["head"]
    report = head.get("fit_report") or {}
    bound = report.get("noise_bound") or {}
    lines += ["", f"The variation head: prior \"{head.get('prior')}\", "
              "log-space correction within "
              f"{[round(v, 3) for v in head.get('prior_correction') or []]}. "
              "Its own fit report (held-out calibration inputs): Spearman "
              f"{_fmt(report.get('spearman'))}, R^2 {_fmt(report.get('r2'))}, "
              f"ratio of means {_fmt(report.get('mean_ratio'))}; noise bound "
              f"R^2 {_fmt(bound.get('r2'))}.", ""]
    oor = res.get("out_of_range")
    if oor:
      lines += _out_of_range_section(oor)
  lines += ["![ratio of means per shift](shift.png)", ""]
  paths["report"] = os.path.join(output_dir, "shift.md")
  with open(paths["report"], "w") as f:
    f.write("\n".join(lines))
  paths["json"] = os.path.join(output_dir, "shift.json")
  with open(paths["json"], "w") as f:
    json.dump(results, f, indent=1, default=float)
  return paths
