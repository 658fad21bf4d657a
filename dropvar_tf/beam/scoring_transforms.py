"""The scoring pipeline's transforms, files and run (Beam and TensorFlow).

`scoring_pipeline` is the entry point (its docstring describes the
pipeline); it imports this module only when a run starts, so that its
command line parses flags before TensorFlow and Beam load.
"""

import json
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import RunInference
import numpy as np

from dropvar_tf import contract
from dropvar_tf import validation
from dropvar_tf.beam import counters
from dropvar_tf.beam import filesystems
from dropvar_tf.beam import model_handler
from dropvar_tf.beam import options
from dropvar_tf.beam import records
from dropvar_tf.beam import sources

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


def _by_shard(row, num_shards):
  key = row[records.KEY_FEATURE]
  return int(records.shard_of([key], num_shards)[0]), row


class WriteScoresFn(beam.DoFn):
  """(shard, rows) -> one score file, sorted by key; yields its index.

  The file's bytes depend only on its rows (sorted; duplicates of a key,
  e.g. from a retried bundle, merged; deterministic encoding), so a retried
  write rewrites the same bytes, on any runner.
  """

  def __init__(self, output_dir, num_shards, output_format, output_shapes):
    self._output_dir = output_dir
    self._num_shards = num_shards
    self._format = output_format
    self._shapes = dict(output_shapes)
    self._duplicates = counters.counter("duplicates_dropped")

  def process(self, item):
    shard, rows = item
    rows = list(rows)
    keys = np.array([r[records.KEY_FEATURE] for r in rows], np.int64)
    values = {name: np.array([r[name] for r in rows], np.float32).reshape(
        (len(rows),) + tuple(self._shapes[name]))
              for name in contract.OUTPUT_KEYS}
    yield write_score_shard(self._output_dir, shard, self._num_shards,
                            self._format, keys, values, self._duplicates)


def write_score_shard(output_dir, index, num_shards, fmt, keys, values,
                      duplicates=None):
  """Writes one score file atomically (rows sorted by key); returns index.

  Args:
    output_dir: the output directory.
    index, num_shards: the shard, of how many.
    fmt: "parquet", "tfrecord" or "jsonl".
    keys: (n,) int64.
    values: {output name: (n, ...) float32}.
    duplicates: optional Beam counter of dropped duplicate rows.

  Returns:
    `index`.

  Raises:
    ValueError: one key with two different scores.
  """
  names = list(values)
  n = len(keys)
  flat = np.concatenate([values[k].reshape(n, -1) for k in names], axis=1)
  keys, flat, dropped = records.merge_duplicates(keys, flat.reshape(n, -1))
  if duplicates is not None:
    duplicates.inc(dropped)
  out, start = {}, 0
  for name in names:
    width = int(np.prod(values[name].shape[1:], dtype=np.int64))
    out[name] = flat[:, start:start + width].reshape(
        (len(keys),) + values[name].shape[1:])
    start += width
  name = records.shard_filename(index, num_shards, fmt,
                                prefix=records.SCORES_PREFIX)
  filesystems.atomic_write(FileSystems.join(output_dir, name),
                           records.encode_shard(keys, out, fmt))
  return int(index)


def finish_scores(written, output_dir, num_shards, fmt, shapes, info):
  """Writes the empty score files, then `scoring.json`, the last file."""
  for index in sorted(set(range(num_shards)) - set(written)):
    write_score_shard(output_dir, index, num_shards, fmt,
                      np.zeros((0,), np.int64),
                      {name: np.zeros((0,) + tuple(shapes[name]), np.float32)
                       for name in contract.OUTPUT_KEYS})
  filesystems.atomic_write(
      FileSystems.join(output_dir, records.SCORING_FILENAME),
      json.dumps(info, indent=2, sort_keys=True).encode())
  return info


def write_scores(scores, output, output_format, shapes, num_shards, info):
  """Adds the score files (by key shard) and `scoring.json` under `output`."""
  return (scores
          | "ByShard" >> beam.Map(_by_shard, num_shards)
          | "GroupByShard" >> beam.GroupByKey()
          | "WriteShards" >> beam.ParDo(WriteScoresFn(
              output, num_shards, output_format, shapes))
          | "CollectShards" >> beam.combiners.ToList()
          | "WriteScoringJson" >> beam.Map(
              finish_scores, output, num_shards, output_format, shapes,
              info))


def prepare_scoring(saved_model_dir, inputs, output,
                    output_format=records.PARQUET, input_format="auto",
                    key_feature=records.KEY_FEATURE, batch_size=256,
                    signature=contract.SERVING_SIGNATURE, num_shards=8):
  """Validates on the launcher; changes nothing in `output` but creating it.

  Returns:
    (config, files, info): the worker config, the matched input files and
    the `scoring.json` content the run writes last.
  """
  records.check_format(output_format, records.SCORE_FORMATS)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  num_shards = validation.check_int(num_shards, "num_shards", 1)
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
      "num_shards": num_shards,
      "output_shapes": shapes,
  }
  if not FileSystems.exists(output):
    FileSystems.mkdirs(output)
  info = {"format_version": records.FORMAT_VERSION,
          "saved_model": saved_model_dir, "signature": signature,
          "batch_size": batch_size, "num_shards": num_shards,
          "output_format": output_format, "output_shapes": shapes,
          "input_files": [[p, s] for p, s in files]}
  return config, files, info


def start_scoring_output(output_dir, info):
  """Called when the pipeline starts: an older `scoring.json` goes if stale.

  A finished output scored with the same settings stays readable: this run
  rewrites the same bytes. One with other settings stops being readable
  now, as its files start to be replaced.
  """
  path = FileSystems.join(output_dir, records.SCORING_FILENAME)
  if FileSystems.exists(path):
    stored = json.loads(filesystems.read_file_bytes(path).decode())
    if stored != json.loads(json.dumps(info)):
      FileSystems.delete([path])


def build_scoring_pipeline(pipeline, saved_model_dir, output, output_format,
                           config, files, info):
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
                      config["output_shapes"], config["num_shards"], info)


def run(saved_model_dir, inputs, output, output_format, input_format,
        key_feature, batch_size, num_shards, signature, pipeline_args):
  """`scoring_pipeline.run_scoring_pipeline` (which documents it)."""
  start = time.perf_counter()
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  saved_model_dir = options.normalize_path(saved_model_dir)
  inputs = [options.normalize_path(p) for p in inputs]
  output = options.normalize_path(output)
  pipeline_options = options.launch_options(
      pipeline_args, {"saved_model_dir": saved_model_dir, "inputs": inputs,
                      "output": output})
  config, files, info = prepare_scoring(
      saved_model_dir, inputs, output, output_format, input_format,
      key_feature, batch_size, signature, num_shards)
  pipeline = beam.Pipeline(options=pipeline_options)
  build_scoring_pipeline(pipeline, saved_model_dir, output, output_format,
                         config, files, info)
  start_scoring_output(output, info)
  result = pipeline.run()
  result.wait_until_finish()
  summary = {"examples_scored": 0, "seconds": time.perf_counter() - start}
  summary["examples_scored"] = counters.totals(result).get(
      "examples_scored", 0)
  return summary
