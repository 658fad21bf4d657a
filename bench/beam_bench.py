"""Benchmark: Beam targets pipeline (DirectRunner) vs in-process targets.

Same model (3x256 ReLU MLP with dropout 0.2, 64 inputs), same data, same
seed and batch size, timed in one run:
  * in-process: `mc_dropout_targets(model, x, ...)` on a numpy array, cold
    (first call: traces and compiles) and warm (second call);
  * beam: `run_targets_pipeline` on the same examples as TFRecord files,
    end to end (launcher model load, read, MC passes, shuffle by shard,
    shard files, manifest), with the DirectRunner in-process and with
    `--direct_running_mode=multi_processing` workers.
Prints seconds, examples/s and the ratio beam / in-process (warm), and checks
that every Beam result equals the in-process targets bitwise. Then, side by
side in the same run:
  * file-count scaling: the same rows in 4 files and in 256 files
    (`--num_samples 2`, so reading dominates), in-process DirectRunner;
  * resume: a full run, and the rerun of a run killed after 60% of its
    batches (its computed batches are saved as part files and skipped), at
    T and 2T.

Usage (needs apache_beam, e.g. .venv-beam/bin/python):
  python bench/beam_bench.py            # N=16384, T=50
  python bench/beam_bench.py --quick    # N=4096, T=20
  python bench/beam_bench.py --only=scaling --repeats=10  # one part
"""

import argparse
import math
import os
import shutil
import tempfile
import time

import numpy as np

from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf.beam import records
from dropvar_tf.beam import targets_pipeline
from dropvar_tf.beam import targets_transforms

_KILLED = "bench: killed"


def build_mlp(input_dim=64, width=256, depth=3, rate=0.2, seed=0):
  keras.utils.set_random_seed(seed)
  x = keras.Input((input_dim,), name="x")
  h = x
  for _ in range(depth):
    h = keras.layers.Dense(width, activation="relu")(h)
    h = keras.layers.Dropout(rate)(h)
  return keras.Model(x, keras.layers.Dense(1)(h))


def _row(name, seconds, n, base):
  ratio = seconds / base if base else float("nan")
  return f"{name:<34} {seconds:8.2f} s {n / seconds:10.0f} ex/s {ratio:7.2f}x"


def _timed_run(model_path, files, output, **kwargs):
  start = time.perf_counter()
  summary = targets_pipeline.run_targets_pipeline(model_path, files, output,
                                                  num_shards=8, **kwargs)
  return time.perf_counter() - start, summary


def file_count_scaling(root, model, model_path, x, batch_size, repeats=3):
  """Wall and CPU seconds of the same rows in 4 and in 256 files (T=2).

  The two layouts alternate, `repeats` times each, so neither one alone
  pays for what the first run of a process pays, and each pair of runs is
  side by side. CPU seconds are this process's (the in-process
  DirectRunner's workers and TensorFlow's threads): on a shared machine
  they move less than wall seconds with the other jobs' load.

  Returns:
    {number of files: [(wall seconds, CPU seconds) of each run]}.
  """
  files = {num_files: records.write_examples(
      os.path.join(root, f"files{num_files}", "ex"), x,
      records.model_input_specs(model), num_shards=num_files)
           for num_files in (4, 256)}
  times = {4: [], 256: []}
  for i in range(repeats):
    for num_files in (256, 4):
      cpu = time.process_time()
      seconds, _ = _timed_run(
          model_path, files[num_files],
          os.path.join(root, f"scaling{num_files}_{i}"), num_samples=2,
          seed=0, batch_size=batch_size)
      times[num_files].append((seconds, time.process_time() - cpu))
  return times


def resume_saving(root, model_path, files, n, kwargs, fraction=0.6,
                  repeats=2):
  """Best full-run seconds, best rerun seconds after a kill at `fraction`.

  Each of `repeats` rounds times a full run, then a run killed after
  `fraction` of its batches and its rerun (the machine is shared: the best
  of the rounds is the least disturbed one).

  Returns:
    (full s, rerun s, batches done before the kill, batches, rerun summary).
  """
  batches = math.ceil(n / (8 * kwargs["batch_size"]))
  kill_at = math.ceil(fraction * batches)
  original = targets_transforms.TargetsFn.process
  done = []

  def killed(fn_self, item):
    if len(done) == kill_at:
      raise RuntimeError(_KILLED)
    elements = list(item[1])
    done.append(len(elements))
    yield from original(fn_self, (item[0], elements))

  full = rerun = float("inf")
  for i in range(repeats):
    tag = f"t{kwargs['num_samples']}_{i}"
    seconds, _ = _timed_run(model_path, files,
                            os.path.join(root, "full" + tag), **kwargs)
    full = min(full, seconds)
    output = os.path.join(root, "killed" + tag)
    done.clear()
    targets_transforms.TargetsFn.process = killed
    try:
      _timed_run(model_path, files, output, **kwargs)
    except Exception as e:
      if _KILLED not in str(e):
        raise
    finally:
      targets_transforms.TargetsFn.process = original
    seconds, summary = _timed_run(model_path, files, output, **kwargs)
    rerun = min(rerun, seconds)
  return full, rerun, kill_at, batches, summary


def throughput(root, model, model_path, files, x, kwargs, workers):
  """In-process targets (cold, warm) against the Beam pipelines, printed."""
  n = len(x)
  start = time.perf_counter()
  reference = targets.mc_dropout_targets(model, x, **kwargs)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  again = targets.mc_dropout_targets(model, x, **kwargs)
  warm = time.perf_counter() - start
  if not np.array_equal(again, reference):
    raise RuntimeError("mc_dropout_targets is not deterministic here.")

  results = []
  modes = [("beam DirectRunner (in-process)", []),
           (f"beam DirectRunner ({workers} processes)",
            [f"--direct_num_workers={workers}",
             "--direct_running_mode=multi_processing"])]
  for name, flags in modes:
    output = os.path.join(root, "out_" + str(len(results)))
    start = time.perf_counter()
    summary = targets_pipeline.run_targets_pipeline(
        model_path, files, output, num_shards=8, pipeline_args=flags,
        **kwargs)
    seconds = time.perf_counter() - start
    _, got = records.read_targets(output)
    results.append((name, seconds, np.array_equal(got, reference),
                    summary["examples_padded"]))

  print(_row("in-process mc_dropout_targets cold", cold, n, warm))
  print(_row("in-process mc_dropout_targets warm", warm, n, warm))
  for name, seconds, equal, padded in results:
    print(_row(name, seconds, n, warm) + f"   bitwise equal: {equal}, "
          f"padded rows {padded / (n + padded):.2%}")
  print("ratio = seconds / in-process warm seconds (lower is better)")
  print()


def print_scaling(times):
  """Prints each pair of runs, the best of each layout and the median."""
  ratios, cpu_ratios = [], []
  for i, ((many, many_cpu), (four, four_cpu)) in enumerate(
      zip(times[256], times[4])):
    ratios.append(many / four)
    cpu_ratios.append(many_cpu / four_cpu)
    print(f"run {i + 1}: 256 files {many:6.2f} s (CPU {many_cpu:6.2f} s)   "
          f"4 files {four:6.2f} s (CPU {four_cpu:6.2f} s)   "
          f"{many / four:5.2f}x (CPU {many_cpu / four_cpu:5.2f}x)")
  best = {k: [min(w for w, _ in v), min(c for _, c in v)]
          for k, v in times.items()}
  print(f"best:  256 files {best[256][0]:6.2f} s (CPU {best[256][1]:6.2f} s)"
        f"   4 files {best[4][0]:6.2f} s (CPU {best[4][1]:6.2f} s)   "
        f"{best[256][0] / best[4][0]:5.2f}x (CPU "
        f"{best[256][1] / best[4][1]:5.2f}x; goal <= 1.2x)")
  print(f"median of the {len(ratios)} pairs' ratios: "
        f"{float(np.median(ratios)):5.2f}x (CPU "
        f"{float(np.median(cpu_ratios)):5.2f}x; goal <= 1.2x)")
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--num_examples", type=int, default=None)
  parser.add_argument("--num_samples", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--workers", type=int, default=2,
                      help="DirectRunner processes in multi_processing mode")
  parser.add_argument("--repeats", type=int, default=3,
                      help="side-by-side runs of each file layout")
  parser.add_argument("--only", default="all",
                      choices=("all", "throughput", "scaling", "resume"),
                      help="run one part of the bench")
  args = parser.parse_args()
  n = args.num_examples or (4096 if args.quick else 16384)
  t = args.num_samples or (20 if args.quick else 50)
  seed = 0
  root = tempfile.mkdtemp(prefix="beam_bench_")
  try:
    model = build_mlp()
    model_path = os.path.join(root, "model.keras")
    model.save(model_path)
    x = np.random.default_rng(0).normal(size=(n, 64)).astype(np.float32)
    files = records.write_examples(os.path.join(root, "ex", "ex"), x,
                                   records.model_input_specs(model),
                                   num_shards=4)
    kwargs = dict(num_samples=t, seed=seed, batch_size=args.batch_size)
    print(f"N={n} examples, T={t} samples, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    if args.only in ("all", "throughput"):
      throughput(root, model, model_path, files, x, kwargs, args.workers)

    if args.only in ("all", "scaling"):
      print(f"file-count scaling: the same N={n} rows, T=2, beam "
            f"DirectRunner (in-process), runs side by side")
      print_scaling(file_count_scaling(root, model, model_path, x,
                                       args.batch_size, args.repeats))

    if args.only in ("all", "resume"):
      print(f"resume: N={n}, beam DirectRunner (in-process), a run killed "
            f"after 60% of its batches, then rerun (best of 2)")
      for samples in (t, 2 * t):
        full, rerun, kill_at, batches, summary = resume_saving(
            root, model_path, files, n, dict(kwargs, num_samples=samples))
        print(f"T={samples:<4} full run {full:6.2f} s   rerun after a kill "
              f"at batch {kill_at}/{batches} {rerun:6.2f} s = "
              f"{rerun / full:4.2f}x   computed {summary['examples_computed']}"
              f", skipped {summary['examples_skipped']}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
