"""Apache Beam pipeline: MC-dropout DPV targets for large data sets.

Computes exactly what `dropvar_tf.targets.mc_dropout_targets` computes (same
statistic, same seed semantics), spread over the workers of any Beam runner
(DirectRunner by default; Dataflow, Flink, Spark with their usual flags).
A model of several outputs (a list or a flat dict of tensors) gets one
target per output, stored as features "target/<output name>" and read back
by `records.read_targets` as the dict `mc_dropout_targets` returns.

    examples (TFRecord of tf.Example with an int64 key, or .npz; one read
              step for any number of files)
      -> [resumed run: drop the examples whose key a part file holds]
      -> work items of `beam_batch_size` examples by key rank
         (`batches.work_items`: only the run's last item is short)
      -> MC targets per batch (model loaded once per worker in `setup`),
         each batch saved as a part file `parts/part-<keys digest>` at once
      -> with the earlier run's parts: GroupByKey(shard_of(key))
      -> one sorted shard file per shard, written atomically
      -> manifest.json (counts, sha256) once every shard is there

Why the result does not depend on the runner, sharding or retries:

* Dropout masks are a pure function of (seed, example key, sample index,
  layer, unit) (see `dropvar_tf.mask_hash`): each example's key is passed as
  `keys=`, so which worker computes which example, and in which batch, does
  not change its masks.
* Every compiled call sees the same shapes as in `mc_dropout_targets(...,
  batch_size=batch_size)`: partial batches are padded to `batch_size` rows
  (as `mc_dropout_targets` itself pads its last batch), so the same kernels
  run and the targets are bitwise equal to the in-process ones on the same
  machine type.
* A shard file is a pure function of its keys' targets (sorted by key;
  duplicate deliveries of a key are merged; records serialized
  deterministically), written to a temporary name and renamed, so a retried
  or re-run shard writes the same bytes again and a killed write leaves no
  partial shard.
* Work is saved at the grain it is done: each computed batch is written
  (atomically, named by its keys) as soon as it is computed. A rerun
  (`resume=True`, the default) reads those parts back, skips their examples
  and computes only the rest, however far the killed run got.
* `manifest.json` is written last; `records.read_targets` refuses a
  directory without it and checks digests, duplicates and missing keys.

Example (DirectRunner, two local processes):

    python -m dropvar_tf.beam.targets_pipeline \\
      --model base.keras --input 'calib-*.tfrecord' --output targets/ \\
      --num_samples 100 --seed 0 \\
      --direct_num_workers 2 --direct_running_mode multi_processing

Then `keys, dpv = read_targets("targets/")`.
"""

import json
import sys

from dropvar_tf import cli_help
from dropvar_tf.beam import flags
from dropvar_tf.beam import formats


def run_targets_pipeline(model_path, inputs, output, num_samples=100, seed=0,
                         statistic="auto", batch_size=256, num_shards=8,
                         output_format=formats.TFRECORD, input_format="auto",
                         key_feature=formats.KEY_FEATURE, input_feature=None,
                         beam_batch_size=None, resume=True, extra_modules=(),
                         pipeline_args=None, show_progress=None):
  """Runs the targets pipeline and waits for it.

  Args:
    model_path: the base model's `.keras` file (any Beam file system); it is
      loaded once per worker, never pickled.
    inputs: a file pattern or a list of them: TFRecord files of
      `tf.train.Example` (features named by `records.model_input_specs`,
      plus the int64 `key_feature`), or `.npz` files (arrays named the same;
      a `key_feature` array, optional for a single file, where keys default
      to row indices as in `mc_dropout_targets`).
    output: output directory (created when missing).
    num_samples, seed, statistic, batch_size: as in `mc_dropout_targets`;
      `batch_size` is also the compute batch of each worker. For a model of
      several outputs, `statistic` applies to each output or is a dict of
      statistics keyed by output name.
    num_shards: number of output shard files.
    output_format: "tfrecord" (tf.Example {key, target}) or "parquet"
      (columns key, target); for several outputs, "target/<output name>"
      per output instead of "target".
    input_format: "auto" (by extension), "tfrecord" or "npz".
    key_feature: name of the int64 example key feature / array.
    input_feature: feature name of a single-input model's input (default:
      its `keras.Input` name).
    beam_batch_size: examples per work item (and part file), a multiple
      of `batch_size` (default 8 * batch_size).
    resume: reuse shard files of an earlier run with the same settings;
      False clears them first.
    extra_modules: modules to import before loading the model (custom
      layers).
    pipeline_args: Beam flags, e.g. ["--runner=DataflowRunner", ...] or
      ["--direct_num_workers=2", "--direct_running_mode=multi_processing"];
      the DirectRunner is the default. Flags of `options.TargetsOptions`
      may be among them (`main` passes its whole argv); the arguments
      above, not those flags, say what to compute.
    show_progress: write a progress line (examples computed and skipped)
      to stderr as batches finish; needs workers in this process (the
      DirectRunner in memory or threads). None: when they are and stderr
      is a terminal. Every runner has the Beam counters.

  Returns:
    dict: "manifest" (the written manifest), "seconds", and the counters
    "examples_computed" (this run), "examples_skipped" (saved by an earlier
    run, read back from its part files), "duplicates_dropped".

  Raises:
    ValueError: an invalid argument (a model with nested outputs too), an
      unknown flag in `pipeline_args`, a runner that cannot run this (see
      `options.check_runner`), or `output` holds a run with other settings
      (and `resume` is True).
    FileNotFoundError: an input pattern matches nothing.
  """
  # Imported here: TensorFlow and Beam take seconds to load, and `main`
  # answers --help and usage errors before.
  from dropvar_tf.beam import targets_transforms
  return targets_transforms.run(
      model_path, inputs, output, num_samples, seed, statistic, batch_size,
      num_shards, output_format, input_format, key_feature, input_feature,
      beam_batch_size, resume, extra_modules, pipeline_args, show_progress)


def main(argv=None):
  """Runs the pipeline on the flags in `argv` (default: sys.argv[1:]).

  Our flags (`flags.add_targets_flags`) are parsed first, before Beam or
  TensorFlow loads: `--help` and a bad or missing flag of ours are answered
  at once. The other arguments (--runner, ...) must be Beam's: Beam's option
  classes (`options.refuse_unknown`) check them before any work. Prints the
  summary as JSON. Beam's INFO logs are off unless `--verbose`.

  Returns:
    0 (the exit status), or 1 after one line on stderr for a model or
    input the pipeline cannot use (a ValueError or OSError).

  Raises:
    SystemExit: status 2 (a usage error, before any work) for an unknown
      or mistyped flag or a missing required one.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  args, rest = flags.parse(flags.TARGETS, argv)
  # Imported here: Beam takes seconds to load (no TensorFlow yet).
  from dropvar_tf.beam import options
  if rest:
    options.refuse_unknown(argv)
  if not args.verbose:
    argv = options.quiet_beam_logs(argv)
    # TensorFlow's native start-up lines (oneDNN, CUDA stubs) off too.
    cli_help.load_tensorflow_quietly()
  try:
    summary = run_targets_pipeline(
        args.model, args.input, args.output, num_samples=args.num_samples,
        seed=args.seed, statistic=args.statistic, batch_size=args.batch_size,
        num_shards=args.num_shards, output_format=args.output_format,
        input_format=args.input_format, key_feature=args.key_feature,
        input_feature=args.input_feature, beam_batch_size=args.beam_batch_size,
        resume=not args.no_resume, extra_modules=args.import_module,
        pipeline_args=argv)
  except (ValueError, OSError) as e:
    # A bad model or input file, found at launch or while running.
    return flags.run_error(e)
  manifest = summary.pop("manifest")
  if manifest is not None:
    summary["num_keys"] = manifest["num_keys"]
  print(json.dumps(summary, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
