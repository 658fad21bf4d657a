"""Apache Beam pipeline: batch scoring of an exported dual SavedModel.

Runs the `serving_default` signature of a SavedModel written by
`dropvar_tf.saved_model.export_saved_model` (or any SavedModel whose
signature returns {"prediction", "variation"}) over a data set and writes one
record per example: its key, the prediction and the one-pass DPV estimate,
and "out_of_range" when the signature returns it (a dual made with
`add_variation_head(out_of_range=True)`); other outputs are not written.
The dual of a model of several outputs returns, and the pipeline writes,
"prediction/<output name>" and "variation/<output name>" per output
(`contract.prediction_key`, `contract.variation_key`) in place of
"prediction" and "variation"; `scoring.json` then adds "output_names"
(sorted: a signature's outputs have no order).
For offline analysis and monitoring (e.g. the share of traffic whose
variation exceeds a threshold, day over day), without a serving cluster.

    examples (TFRecord of tf.Example with an int64 key, or .npz; one read
              step for any number of files)
      -> [resumed run: drop the examples whose key a part file holds]
      -> work items of `beam_batch_size` examples by key rank
         (`batches.work_items`: only the run's last item is short)
      -> RunInference(KeyedModelHandler(model_handler.SignatureHandler)
         .with_no_batching()): serving_default on calls of exactly
         `batch_size` rows, the run's last one padded (SavedModel loaded
         once per worker process)
      -> each item's scores saved as a part file `parts/part-<keys digest>`
         at once (a rerun after a kill scores only what is missing)
      -> with the earlier run's parts: GroupByKey(shard_of(key))
      -> scores-SSSSS-of-NNNNN.{parquet,tfrecord,jsonl}, sorted by key,
         each written atomically
      -> scoring.json (format, shapes, settings) last

Input features are named after the signature's inputs (`saved_model_cli show
--dir ... --signature_def serving_default`, or `records.signature_input_specs`).
Per-example outputs of one value are written as scalars, others as lists.
Without "out_of_range" the files of a single-output dual are {key,
prediction, variation} only.
A score file's bytes depend only on its keys and the settings (the same on
every runner). `scoring.json`, written once every file is there, records the
format and shapes; `records.read_scores(output)` reads everything back
ordered by key, without Beam.

Example:

    python -m dropvar_tf.beam.scoring_pipeline \\
      --saved_model /models/criteo/3 --input 'day_23-*.tfrecord' \\
      --output scores/ --output_format parquet
"""

import json
import sys

from dropvar_tf import cli_help
from dropvar_tf import contract
from dropvar_tf.beam import flags
from dropvar_tf.beam import formats


def run_scoring_pipeline(saved_model_dir, inputs, output,
                         output_format=formats.PARQUET, input_format="auto",
                         key_feature=formats.KEY_FEATURE, batch_size=256,
                         num_shards=8, signature=contract.SERVING_SIGNATURE,
                         pipeline_args=None, beam_batch_size=None,
                         resume=True, show_progress=None):
  """Scores every example of `inputs` with a SavedModel; waits for the end.

  Args:
    saved_model_dir: a SavedModel version folder (`<base>/<version>`).
    inputs: file pattern(s): TFRecord of tf.Example (features named after
      the signature's inputs, plus the int64 `key_feature`) or `.npz`.
    output: output directory: `scores-*.<format>` and `scoring.json`.
    output_format: "parquet", "tfrecord" or "jsonl".
    input_format: "auto" (by extension), "tfrecord" or "npz".
    key_feature: name of the int64 example key feature / array.
    batch_size: rows of every signature call (smaller batches are padded):
      scores equal the signature called in-process on batches of this size.
    num_shards: output files `scores-SSSSS-of-NNNNN.<format>`; key k goes
      to file `records.shard_of(k, num_shards)`, sorted by key.
    signature: the signature to call.
    beam_batch_size: examples per work item and part file, a multiple of
      `batch_size` (default 8 * batch_size).
    resume: reuse the part files of an earlier run with the same settings
      (`settings.json`) and score only the other examples; False clears the
      earlier scores, parts and `scoring.json` first.
    pipeline_args: Beam flags (runner and its options); DirectRunner
      default. Flags of `options.ScoringOptions` may be among them (`main`
      passes its whole argv); the arguments above, not those flags, say
      what to score.
    show_progress: write a progress line (examples scored and skipped) to
      stderr as items finish; needs workers in this process (the
      DirectRunner in memory or threads). None: when they are and stderr
      is a terminal. Every runner has the Beam counters.

  The score files hold, per example, the key, "prediction", "variation"
  (for a dual of several outputs "prediction/<output name>" and
  "variation/<output name>" per output, sorted) and, when the signature
  returns it, "out_of_range" (`records.score_names`).

  Returns:
    dict: "seconds" and the counters "examples_scored" (this run),
    "examples_skipped" (saved by an earlier run, read back from its part
    files), "examples_padded" (rows added to the run's last call) and
    "duplicates_dropped".

  Raises:
    ValueError: an invalid argument, an unknown flag in `pipeline_args`, a
      runner that cannot run this (see `options.check_runner`), a
      signature without the contract's outputs (neither "prediction" and
      "variation" nor both per output name), or `output` holds scores
      of other settings (and `resume` is True).
    FileNotFoundError: an input pattern matches nothing.
  """
  # Imported here: TensorFlow and Beam take seconds to load, and `main`
  # answers --help and usage errors before.
  from dropvar_tf.beam import scoring_transforms
  return scoring_transforms.run(
      saved_model_dir, inputs, output, output_format, input_format,
      key_feature, batch_size, num_shards, signature, beam_batch_size,
      resume, pipeline_args, show_progress)


def main(argv=None):
  """Runs the pipeline on the flags in `argv` (default: sys.argv[1:]).

  Our flags (`flags.add_scoring_flags`) are parsed first, before Beam or
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
  args, rest = flags.parse(flags.SCORING, argv)
  # Imported here: Beam takes seconds to load (no TensorFlow yet).
  from dropvar_tf.beam import options
  if rest:
    options.refuse_unknown(argv)
  if not args.verbose:
    argv = options.quiet_beam_logs(argv)
    # TensorFlow's native start-up lines (oneDNN, CUDA stubs) off too.
    cli_help.load_tensorflow_quietly()
  try:
    summary = run_scoring_pipeline(
        args.saved_model, args.input, args.output,
        output_format=args.output_format, input_format=args.input_format,
        key_feature=args.key_feature, batch_size=args.batch_size,
        num_shards=args.num_shards, signature=args.signature,
        beam_batch_size=args.beam_batch_size, resume=not args.no_resume,
        pipeline_args=argv)
  except (ValueError, OSError) as e:
    # A bad model or input file, found at launch or while running.
    return flags.run_error(e)
  print(json.dumps(summary, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
