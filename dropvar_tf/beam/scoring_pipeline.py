"""Apache Beam pipeline: batch scoring of an exported dual SavedModel.

Runs the `serving_default` signature of a SavedModel written by
`dropvar_tf.saved_model.export_saved_model` (or any SavedModel whose
signature returns {"prediction", "variation"}) over a data set and writes one
record per example: its key, the prediction and the one-pass DPV estimate.
For offline analysis and monitoring (e.g. the share of traffic whose
variation exceeds a threshold, day over day), without a serving cluster.

    examples (TFRecord of tf.Example with an int64 key, or .npz)
      -> (key, {input name: array}) per example
      -> RunInference(KeyedModelHandler(model_handler.SignatureHandler)):
         BatchElements, then serving_default on batches padded to
         `batch_size` rows (SavedModel loaded once per worker process)
      -> scores-SSSSS-of-NNNNN.{parquet,tfrecord,jsonl} (Beam's file sinks:
         written to temporary files and renamed when the pipeline commits)

Input features are named after the signature's inputs (`saved_model_cli show
--dir ... --signature_def serving_default`, or `records.signature_input_specs`).
Per-example outputs of one value are written as scalars, others as lists.
`scoring.json` beside the files records the shapes; `records.read_scores`
reads everything back ordered by key.

Example:

    python -m dropvar_tf.beam.scoring_pipeline \\
      --saved_model /models/criteo/3 --input 'day_23-*.tfrecord' \\
      --output scores/ --output_format parquet
"""

import json
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import RunInference
import numpy as np

from dropvar_tf import contract
from dropvar_tf import validation
from dropvar_tf._keras import tf
from dropvar_tf.beam import counters
from dropvar_tf.beam import filesystems
from dropvar_tf.beam import model_handler
from dropvar_tf.beam import options
from dropvar_tf.beam import records
from dropvar_tf.beam import sources

SCORING_FILENAME = "scoring.json"
SCORES_PREFIX = "scores"


def _per_example_shape(spec):
  """Stored shape of one example's output: () when it has one value."""
  shape = [int(d) for d in spec.shape[1:]]
  return [] if int(np.prod(shape, dtype=np.int64)) == 1 else shape


def output_shapes(fn):
  """{"prediction": shape, "variation": shape} stored per example.

  Raises:
    ValueError: the signature lacks one of the contract's output keys.
  """
  outputs = fn.structured_outputs
  missing = [k for k in contract.OUTPUT_KEYS if k not in outputs]
  if missing:
    raise validation.invalid(
        "saved_model", f"a signature returning {list(contract.OUTPUT_KEYS)}",
        f"outputs {sorted(outputs)}")
  return {k: _per_example_shape(outputs[k]) for k in contract.OUTPUT_KEYS}


class ScoreRecordFn(beam.DoFn):
  """(key, PredictionResult) -> score record {key, prediction, variation}.

  Outputs are float32, reshaped to the per-example `output_shapes` (a
  one-value output becomes a scalar).
  """

  def __init__(self, output_shapes):
    self._output_shapes = dict(output_shapes)
    self._scored = counters.counter("examples_scored")

  def process(self, element):
    key, result = element
    self._scored.inc()
    row = {records.KEY_FEATURE: int(key)}
    for name in contract.OUTPUT_KEYS:
      value = np.asarray(result.inference[name], np.float32)
      row[name] = value.reshape(self._output_shapes[name]).tolist()
    yield row


def _to_example(row):
  feature = {records.KEY_FEATURE: tf.train.Feature(
      int64_list=tf.train.Int64List(value=[row[records.KEY_FEATURE]]))}
  for name in contract.OUTPUT_KEYS:
    value = np.asarray(row[name], np.float32).ravel()
    feature[name] = tf.train.Feature(float_list=tf.train.FloatList(
        value=value))
  return records.serialize_example(feature)


def _parquet_schema(shapes):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  fields = [(records.KEY_FEATURE, pa.int64())]
  for name in contract.OUTPUT_KEYS:
    if shapes[name]:
      width = int(np.prod(shapes[name]))
      fields.append((name, pa.list_(pa.float32(), width)))
    else:
      fields.append((name, pa.float32()))
  return pa.schema(fields)


def _flat(row):
  return {k: (np.asarray(v, np.float32).ravel().tolist()
              if isinstance(v, list) else v) for k, v in row.items()}


def write_scores(scores, output, output_format, shapes, num_shards):
  """Adds the file sink of `output_format` under `output`."""
  prefix = FileSystems.join(output, SCORES_PREFIX)
  suffix = f".{output_format}"
  if output_format == records.PARQUET:
    return (scores
            | "Flatten" >> beam.Map(_flat)
            | "WriteParquet" >> beam.io.WriteToParquet(
                prefix, _parquet_schema(shapes), file_name_suffix=suffix,
                num_shards=num_shards))
  if output_format == records.TFRECORD:
    return (scores
            | "ToExample" >> beam.Map(_to_example)
            | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                prefix, file_name_suffix=suffix, num_shards=num_shards))
  return (scores
          | "ToJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
          | "WriteJsonl" >> beam.io.WriteToText(
              prefix, file_name_suffix=suffix, num_shards=num_shards))


def prepare_scoring(saved_model_dir, inputs, output,
                    output_format=records.PARQUET, input_format="auto",
                    key_feature=records.KEY_FEATURE, batch_size=256,
                    signature=contract.SERVING_SIGNATURE):
  """Validates on the launcher; writes `scoring.json`; returns the config."""
  records.check_format(output_format, records.SCORE_FORMATS)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  if isinstance(inputs, str):
    inputs = [inputs]
  files = sources.match_inputs(inputs)
  input_format = sources.resolve_input_format(input_format, files)
  _, fn = model_handler.load_signature(saved_model_dir, signature)
  shapes = output_shapes(fn)
  config = {
      "signature": signature,
      "input_format": input_format,
      "input_specs": records.signature_input_specs(fn),
      "key_feature": key_feature,
      "batch_size": batch_size,
      "output_shapes": shapes,
  }
  if not FileSystems.exists(output):
    FileSystems.mkdirs(output)
  info = {"saved_model": saved_model_dir, "signature": signature,
          "output_format": output_format, "output_shapes": shapes,
          "input_files": [[p, s] for p, s in files]}
  filesystems.atomic_write(
      FileSystems.join(output, SCORING_FILENAME),
      json.dumps(info, indent=2, sort_keys=True).encode())
  return config, files


def build_scoring_pipeline(pipeline, saved_model_dir, output, output_format,
                           config, files, num_shards=0):
  """Adds the scoring transforms to `pipeline`."""
  examples = sources.keyed_examples(
      pipeline, files, config["input_format"], config["input_specs"],
      config["key_feature"], config["batch_size"])
  handler = KeyedModelHandler(model_handler.SignatureHandler(
      saved_model_dir, config["signature"],
      batch_size=config["batch_size"]))
  scores = (examples
            | "Score" >> RunInference(handler)
            | "ToRecord" >> beam.ParDo(ScoreRecordFn(config["output_shapes"])))
  return write_scores(scores, output, output_format,
                      config["output_shapes"], num_shards)


def run_scoring_pipeline(saved_model_dir, inputs, output,
                         output_format=records.PARQUET, input_format="auto",
                         key_feature=records.KEY_FEATURE, batch_size=256,
                         num_shards=0, signature=contract.SERVING_SIGNATURE,
                         pipeline_args=None):
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
    num_shards: output files; 0 lets the runner choose.
    signature: the signature to call.
    pipeline_args: Beam flags (runner and its options); DirectRunner
      default. Flags of `options.ScoringOptions` may be among them (`main`
      passes its whole argv); the arguments above, not those flags, say
      what to score.

  Returns:
    dict with "examples_scored" and "seconds".

  Raises:
    ValueError: an invalid argument, an unknown flag in `pipeline_args`, a
      runner that cannot run this (see `options.check_runner`), or a
      signature without the contract's outputs.
    FileNotFoundError: an input pattern matches nothing.
  """
  start = time.perf_counter()
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  saved_model_dir = options.normalize_path(saved_model_dir)
  inputs = [options.normalize_path(p) for p in inputs]
  output = options.normalize_path(output)
  pipeline_options = options.launch_options(
      pipeline_args, {"saved_model_dir": saved_model_dir, "inputs": inputs,
                      "output": output})
  config, files = prepare_scoring(saved_model_dir, inputs, output,
                                  output_format, input_format, key_feature,
                                  batch_size, signature)
  num_shards = validation.check_int(num_shards, "num_shards", 0)
  pipeline = beam.Pipeline(options=pipeline_options)
  build_scoring_pipeline(pipeline, saved_model_dir, output, output_format,
                         config, files, num_shards)
  result = pipeline.run()
  result.wait_until_finish()
  summary = {"examples_scored": 0, "seconds": time.perf_counter() - start}
  summary["examples_scored"] = counters.totals(result).get(
      "examples_scored", 0)
  return summary


def read_scores(output):
  """Reads a scoring output directory: dict of key-ordered arrays.

  Returns:
    {"key": (N,) int64 ascending, "prediction": (N, ...) float32,
    "variation": (N, ...) float32}.
  """
  info = records.read_json(FileSystems.join(output, SCORING_FILENAME))
  if info is None:
    raise ValueError(f"No {SCORING_FILENAME} in {output!r}: not a scoring "
                     f"pipeline output.")
  return records.read_scores(
      FileSystems.join(output, f"{SCORES_PREFIX}-*"), info["output_format"],
      info["output_shapes"][contract.PREDICTION_KEY],
      info["output_shapes"][contract.VARIATION_KEY])


def main(argv=None):
  """Runs the pipeline on the flags in `argv` (default: sys.argv[1:]).

  Our flags are `options.ScoringOptions`; the others (--runner, ...) are
  Beam's. Prints the summary as JSON.

  Returns:
    0 (the exit status).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  args = options.parse(options.ScoringOptions, argv)
  summary = run_scoring_pipeline(
      args.saved_model, args.input, args.output,
      output_format=args.output_format, input_format=args.input_format,
      key_feature=args.key_feature, batch_size=args.batch_size,
      num_shards=args.num_shards, signature=args.signature,
      pipeline_args=argv)
  print(json.dumps(summary, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
