"""Apache Beam pipeline: MC-dropout DPV targets for large data sets.

Computes exactly what `dropvar_tf.targets.mc_dropout_targets` computes (same
statistic, same seed semantics), spread over the workers of any Beam runner
(DirectRunner by default; Dataflow, Flink, Spark with their usual flags):

    examples (TFRecord of tf.Example with an int64 key, or .npz)
      -> BatchElements (fixed size: a multiple of `batch_size`)
      -> MC targets per batch (model loaded once per worker in `setup`)
      -> GroupByKey(shard_of(key))
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
  duplicate deliveries of a key are merged), written to a temporary name and
  renamed, so a retried or re-run shard writes the same bytes again and a
  killed write leaves no partial shard. A rerun (`resume=True`, the default)
  skips the examples of shards already written and computes the rest.
* `manifest.json` is written last; `records.read_targets` refuses a
  directory without it and checks digests, duplicates and missing keys.

Example (DirectRunner, two local processes):

    python -m dropvar_tf.beam.targets_pipeline \\
      --model base.keras --input 'calib-*.tfrecord' --output targets/ \\
      --num_samples 100 --seed 0 \\
      --direct_num_workers 2 --direct_running_mode multi_processing

Then `keys, dpv = read_targets("targets/")`.
"""

import importlib
import json
import math
import os
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
import numpy as np

from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf import sources as dropout_sources
from dropvar_tf import targets
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf.beam import counters
from dropvar_tf.beam import filesystems
from dropvar_tf.beam import options
from dropvar_tf.beam import records
from dropvar_tf.beam import sources

# Modules that register dropvar_tf's Keras layers; imported before loading.
_REGISTERING_MODULES = ("dropvar_tf.seeded_dropout", "dropvar_tf.layers",
                        "dropvar_tf.heads", "dropvar_tf.study.models.reference")


# ---------------------------------------------------------------------------
# The base model.


def import_modules(names):
  """Imports the modules that register custom layers, then `names`."""
  for name in _REGISTERING_MODULES + tuple(names or ()):
    importlib.import_module(name)


def load_keras_model(path, extra_modules=()):
  """Loads a `.keras` file (local or any Beam file system), compile=False.

  Args:
    path: the model file.
    extra_modules: modules to import first (they register custom layers).

  Returns:
    The `keras.Model`.
  """
  import_modules(extra_modules)
  if filesystems.is_local(path):
    return keras.saving.load_model(path, compile=False)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "model.keras")
    with open(local, "wb") as f:
      f.write(filesystems.read_file_bytes(path))
    return keras.saving.load_model(local, compile=False)


# ---------------------------------------------------------------------------
# The targets pipeline.


def resolve_statistic(model, statistic):
  """(statistic, per-example target shape) as `mc_dropout_targets` has them."""
  if not isinstance(statistic, str) or statistic not in contract.STATISTICS:
    raise validation.invalid("statistic", f"one of {contract.STATISTICS}",
                             statistic)
  if len(model.outputs) != 1:
    raise validation.invalid("model", "a model with a single output tensor",
                             f"{len(model.outputs)} outputs")
  out_shape = tuple(model.outputs[0].shape[1:])
  units = int(np.prod(out_shape, dtype=np.int64))
  statistic = validation.resolve_statistic(
      statistic, units, keras_graph.output_is_probabilities(model))
  if statistic == contract.STAT_PREDICTED_CLASS_STD or units == 1:
    return statistic, []
  return statistic, [int(d) for d in out_shape]


class TargetsFn(beam.DoFn):
  """Batch of raw examples -> (shard, (keys, targets)) per shard in it.

  The model is loaded once per worker in `setup` from its `.keras` file and
  checked against the fingerprint the launcher saw.
  """

  def __init__(self, model_path, config):
    self._model_path = model_path
    self._config = dict(config)
    self._model = None
    self._computed = counters.counter("examples_computed")
    self._skipped = counters.counter("examples_skipped")

  def setup(self):
    c = self._config
    self._model = load_keras_model(self._model_path, c["import_modules"])
    if targets.model_fingerprint(self._model) != c["model_fingerprint"]:
      raise ValueError(f"The model file {self._model_path!r} changed while "
                       f"the pipeline ran (weight fingerprint differs).")

  def process(self, batch):
    c = self._config
    keys, x = sources.decode_batch(batch, c["input_format"],
                                   c["input_specs"], c["key_feature"])
    shards = records.shard_of(keys, c["num_shards"])
    todo = ~np.isin(shards, c["done_shards"])
    self._skipped.inc(int((~todo).sum()))
    if not todo.any():
      return
    if not todo.all():
      keys, shards = keys[todo], shards[todo]
      x = _take_rows(x, np.flatnonzero(todo))
    n = len(keys)
    # Pad to a whole number of compute batches: every compiled call then has
    # the shapes of the in-process run, hence bitwise-equal targets.
    rows = c["batch_size"] * math.ceil(n / c["batch_size"])
    idx = np.concatenate([np.arange(n), np.full(rows - n, n - 1)])
    values = targets.mc_dropout_targets(
        self._model, _take_rows(x, idx), num_samples=c["num_samples"],
        seed=c["seed"], batch_size=c["batch_size"],
        statistic=c["statistic"], keys=keys[idx], progress=False)[:n]
    self._computed.inc(n)
    for shard in np.unique(shards):
      sel = shards == shard
      yield int(shard), (keys[sel], values[sel])


def _take_rows(x, idx):
  if isinstance(x, dict):
    return {k: v[idx] for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [v[idx] for v in x]
  return x[idx]


class WriteShardFn(beam.DoFn):
  """(shard, [(keys, targets), ...]) -> one sorted shard file + its entry."""

  def __init__(self, output_dir, num_shards, output_format):
    self._output_dir = output_dir
    self._num_shards = num_shards
    self._format = output_format
    self._duplicates = counters.counter("duplicates_dropped")

  def process(self, item):
    shard, parts = item
    parts = list(parts)
    keys = np.concatenate([k for k, _ in parts])
    values = np.concatenate([v for _, v in parts])
    keys, values, dropped = records.merge_duplicates(keys, values)
    self._duplicates.inc(dropped)
    yield write_shard(self._output_dir, shard, self._num_shards,
                      self._format, keys, values)


def write_shard(output_dir, index, num_shards, fmt, keys, values):
  """Writes one shard file atomically; returns its manifest entry."""
  name = records.shard_filename(index, num_shards, fmt)
  data = records.encode_shard(keys, values, fmt)
  filesystems.atomic_write(FileSystems.join(output_dir, name), data)
  return {"index": int(index), "file": name, "count": int(len(keys)),
          "sha256": records.sha256(data)}


def existing_shards(output_dir, num_shards, fmt):
  """Indices of shard files already in `output_dir` (complete by design)."""
  pattern = FileSystems.join(
      output_dir, f"{records.SHARD_PREFIX}-*-of-{num_shards:05d}.{fmt}")
  found = set()
  for m in FileSystems.match([pattern])[0].metadata_list:
    name = m.path.rsplit("/", 1)[-1]
    try:
      found.add(int(name.split("-")[1]))
    except ValueError:
      continue
  return sorted(i for i in found if i < num_shards)


def finalize(entries, num_input_records, output_dir, settings):
  """Completes missing entries (skipped or empty shards); writes the manifest.

  Returns:
    The manifest dict.
  """
  num_shards = settings["num_shards"]
  fmt = settings["output_format"]
  shape = tuple(settings["target_shape"])
  by_index = {e["index"]: e for e in entries}
  for index in range(num_shards):
    if index in by_index:
      continue
    name = records.shard_filename(index, num_shards, fmt)
    path = FileSystems.join(output_dir, name)
    if FileSystems.exists(path):  # Written by an earlier (resumed) run.
      data = filesystems.read_file_bytes(path)
      keys, _ = records.decode_shard(data, fmt,
                                     {records.TARGET_FEATURE: shape})
      by_index[index] = {"index": index, "file": name, "count": len(keys),
                         "sha256": records.sha256(data)}
    else:  # No example hashed to this shard.
      by_index[index] = write_shard(
          output_dir, index, num_shards, fmt, np.zeros((0,), np.int64),
          np.zeros((0,) + shape, np.float32))
  shards = [by_index[i] for i in range(num_shards)]
  manifest = dict(settings)
  manifest.update({
      "shards": shards,
      "num_keys": int(sum(e["count"] for e in shards)),
      "num_input_records": int(num_input_records),
  })
  filesystems.atomic_write(
      FileSystems.join(output_dir, records.MANIFEST_FILENAME),
      json.dumps(manifest, indent=2, sort_keys=True).encode())
  return manifest


def _check_settings(output_dir, settings, resume):
  """Writes settings.json, or checks it against an earlier run's."""
  path = FileSystems.join(output_dir, records.SETTINGS_FILENAME)
  if FileSystems.exists(path):
    stored = json.loads(filesystems.read_file_bytes(path).decode())
    if resume:
      for name, value in settings.items():
        if stored.get(name) != value:
          raise validation.invalid(
              "output", f"a directory written with the same settings, or "
              f"resume=False; its `{name}` is {stored.get(name)!r}, this "
              f"run's is {value!r}", output_dir)
      return
  filesystems.atomic_write(
      path, json.dumps(settings, indent=2, sort_keys=True).encode())


def _clear_output(output_dir):
  """Removes earlier shards and manifest (resume=False)."""
  pattern = FileSystems.join(output_dir, f"{records.SHARD_PREFIX}-*")
  paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
  manifest = FileSystems.join(output_dir, records.MANIFEST_FILENAME)
  if FileSystems.exists(manifest):
    paths.append(manifest)
  if paths:
    FileSystems.delete(paths)


def _check_args(num_samples, seed, batch_size, num_shards, output_format,
                beam_batch_size):
  num_samples = validation.check_int(num_samples, "num_samples", 2)
  seed = validation.check_int(seed, "seed", 0)
  if seed >= 2**32:
    raise validation.invalid("seed", "an integer in [0, 2**32)", seed)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  num_shards = validation.check_int(num_shards, "num_shards", 1)
  records.check_format(output_format, records.TARGET_FORMATS)
  if beam_batch_size is None:
    beam_batch_size = 8 * batch_size
  beam_batch_size = validation.check_int(beam_batch_size, "beam_batch_size",
                                         1)
  if beam_batch_size % batch_size:
    raise validation.invalid(
        "beam_batch_size", f"a multiple of batch_size ({batch_size}), so "
        f"that no compute batch is padded but the last", beam_batch_size)
  return num_samples, seed, batch_size, num_shards, beam_batch_size


def prepare_targets(model_path, inputs, output, num_samples=100, seed=0,
                    statistic="auto", batch_size=256, num_shards=8,
                    output_format=records.TFRECORD, input_format="auto",
                    key_feature=records.KEY_FEATURE, input_feature=None,
                    beam_batch_size=None, resume=True, extra_modules=()):
  """Validates everything on the launcher and prepares the output directory.

  Returns:
    (settings, config, files): settings.json content, the worker config and
    the matched input files.
  """
  num_samples, seed, batch_size, num_shards, beam_batch_size = _check_args(
      num_samples, seed, batch_size, num_shards, output_format,
      beam_batch_size)
  if isinstance(inputs, str):
    inputs = [inputs]
  files = sources.match_inputs(inputs)
  input_format = sources.resolve_input_format(input_format, files)
  model = load_keras_model(model_path, extra_modules)
  dropout_sources.check_dropout_model(model)
  statistic, target_shape = resolve_statistic(model, statistic)
  input_specs = records.model_input_specs(model, input_feature)
  settings = {
      "format_version": records.FORMAT_VERSION,
      "model_fingerprint": targets.model_fingerprint(model),
      "num_samples": num_samples,
      "seed": seed,
      "statistic": statistic,
      "target_shape": target_shape,
      "num_shards": num_shards,
      "output_format": output_format,
      "key_feature": key_feature,
      "input_specs": input_specs,
      "input_format": input_format,
      "input_files": [[p, s] for p, s in files],
  }
  if not FileSystems.exists(output):
    FileSystems.mkdirs(output)
  _check_settings(output, settings, resume)
  manifest = FileSystems.join(output, records.MANIFEST_FILENAME)
  if not resume:
    _clear_output(output)
  elif FileSystems.exists(manifest):
    FileSystems.delete([manifest])  # Rewritten when this run completes.
  done = existing_shards(output, num_shards, output_format) if resume else []
  config = {
      "model_fingerprint": settings["model_fingerprint"],
      "num_samples": num_samples,
      "seed": seed,
      "statistic": statistic,
      "batch_size": batch_size,
      "beam_batch_size": beam_batch_size,
      "num_shards": num_shards,
      "done_shards": done,
      "input_format": input_format,
      "input_specs": input_specs,
      "key_feature": key_feature,
      "import_modules": list(extra_modules or ()),
  }
  return settings, config, files


def build_targets_pipeline(pipeline, model_path, output, settings, config,
                           files):
  """Adds the targets transforms to `pipeline`; returns the manifest PColl."""
  examples = sources.read_examples(pipeline, files, config["input_format"],
                                   config["input_specs"],
                                   config["key_feature"])
  count = examples | "CountInputs" >> beam.combiners.Count.Globally()
  entries = (
      examples
      | "Batch" >> beam.BatchElements(
          min_batch_size=config["beam_batch_size"],
          max_batch_size=config["beam_batch_size"])
      | "MCTargets" >> beam.ParDo(TargetsFn(model_path, config))
      | "GroupByShard" >> beam.GroupByKey()
      | "WriteShards" >> beam.ParDo(WriteShardFn(
          output, config["num_shards"], settings["output_format"])))
  return (entries
          | "CollectShards" >> beam.combiners.ToList()
          | "WriteManifest" >> beam.Map(
              finalize, beam.pvalue.AsSingleton(count), output, settings))


def run_targets_pipeline(model_path, inputs, output, num_samples=100, seed=0,
                         statistic="auto", batch_size=256, num_shards=8,
                         output_format=records.TFRECORD, input_format="auto",
                         key_feature=records.KEY_FEATURE, input_feature=None,
                         beam_batch_size=None, resume=True, extra_modules=(),
                         pipeline_args=None):
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
      `batch_size` is also the compute batch of each worker.
    num_shards: number of output shard files.
    output_format: "tfrecord" (tf.Example {key, target}) or "parquet"
      (columns key, target).
    input_format: "auto" (by extension), "tfrecord" or "npz".
    key_feature: name of the int64 example key feature / array.
    input_feature: feature name of a single-input model's input (default:
      its `keras.Input` name).
    beam_batch_size: examples per `BatchElements` batch, a multiple of
      `batch_size` (default 8 * batch_size).
    resume: reuse shard files of an earlier run with the same settings;
      False clears them first.
    extra_modules: modules to import before loading the model (custom
      layers).
    pipeline_args: Beam flags, e.g. ["--runner=DataflowRunner", ...] or
      ["--direct_num_workers=2", "--direct_running_mode=multi_processing"];
      the DirectRunner is the default. Flags of `options.TargetsOptions`
      may be among them (`main` passes its whole argv); the arguments
      above, not those flags, say what to compute.

  Returns:
    dict: "manifest" (the written manifest), "seconds", and the counters
    "examples_computed", "examples_skipped", "duplicates_dropped".

  Raises:
    ValueError: an invalid argument, or `output` holds a run with other
      settings (and `resume` is True).
    FileNotFoundError: an input pattern matches nothing.
  """
  start = time.perf_counter()
  settings, config, files = prepare_targets(
      model_path, inputs, output, num_samples=num_samples, seed=seed,
      statistic=statistic, batch_size=batch_size, num_shards=num_shards,
      output_format=output_format, input_format=input_format,
      key_feature=key_feature, input_feature=input_feature,
      beam_batch_size=beam_batch_size, resume=resume,
      extra_modules=extra_modules)
  pipeline = beam.Pipeline(
      options=PipelineOptions(list(pipeline_args or [])))
  build_targets_pipeline(pipeline, model_path, output, settings, config, files)
  result = pipeline.run()
  result.wait_until_finish()
  manifest = records.read_json(
      FileSystems.join(output, records.MANIFEST_FILENAME)) if (
          filesystems.is_local(output)) else None
  summary = {"manifest": manifest,
             "seconds": time.perf_counter() - start,
             "examples_computed": 0, "examples_skipped": 0,
             "duplicates_dropped": 0}
  summary.update(counters.totals(result))
  return summary


def main(argv=None):
  """Runs the pipeline on the flags in `argv` (default: sys.argv[1:]).

  Our flags are `options.TargetsOptions`; the others (--runner, ...) are
  Beam's. Prints the summary as JSON.

  Returns:
    0 (the exit status).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  args = options.TargetsOptions(argv)
  options.require(args, options.TargetsOptions.REQUIRED)
  summary = run_targets_pipeline(
      args.model, args.input, args.output, num_samples=args.num_samples,
      seed=args.seed, statistic=args.statistic, batch_size=args.batch_size,
      num_shards=args.num_shards, output_format=args.output_format,
      input_format=args.input_format, key_feature=args.key_feature,
      input_feature=args.input_feature, beam_batch_size=args.beam_batch_size,
      resume=not args.no_resume, extra_modules=args.import_module,
      pipeline_args=argv)
  manifest = summary.pop("manifest")
  if manifest is not None:
    summary["num_keys"] = manifest["num_keys"]
  print(json.dumps(summary, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
