"""Exports a dual model as a versioned SavedModel for TF Serving.

`export_saved_model(dual, export_base)` writes `<export_base>/<version>/`:

```
<export_base>/                  # TF Serving's --model_base_path
  1/
    saved_model.pb              # signatures: serving_default, metadata,
    variables/                  #   and mc_dropout (optional)
    assets/dropvar_tf_metadata.json
    assets.extra/tf_serving_warmup_requests   # optional
  2/ ...
```

The version folder appears in one `os.rename` of a complete temporary folder
(`.tmp-<version>-<hex>`, a name TF Serving's version poller skips because it is
not an integer), so a server polling `export_base` never sees half a model.
"""

import contextlib
import datetime
import json
import os
import shutil
import uuid

import numpy as np
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from dropvar_tf import contract
from dropvar_tf import export_checks
from dropvar_tf import head_layers
from dropvar_tf import heads
from dropvar_tf import inputs as inputs_lib
from dropvar_tf import keras_graph
from dropvar_tf import mask_hash
from dropvar_tf import seeded_dropout
from dropvar_tf import sources
from dropvar_tf import validation
from dropvar_tf._keras import keras, tf
from dropvar_tf.version import __version__

# Signature returning the metadata JSON as a scalar string (no inputs).
METADATA_SIGNATURE = "metadata"
METADATA_OUTPUT_KEY = "metadata"
WARMUP_FILENAME = "tf_serving_warmup_requests"
WARMUP_DIRNAME = "assets.extra"
TMP_PREFIX = ".tmp-"
# Bumped when the layout of the metadata JSON changes incompatibly.
METADATA_FORMAT = 1

# TF Serving reads at most 1000 warmup records; a few batches are enough to
# trigger lazy initialisation and compile the common shapes.
_MAX_WARMUP_REQUESTS = 4


# ---------------------------------------------------------------------------
# Inputs: names, specs and the model's own input structure.


def _input_entries(dual):
  """Returns [(serving_name, keras_tensor)] and a function that rebuilds the
  model's input structure from a {serving_name: tensor} dict.

  Dict inputs keep their dict keys (e.g. "user_id", "movie_id"); single and
  list inputs are named by their `keras.Input` names. A ragged input `name`
  comes as `name` (rows padded to the longest) and `name_row_lengths`
  (`inputs.ROW_LENGTHS_SUFFIX`), turned back into the RaggedTensor.
  """
  struct = dual.input
  if isinstance(struct, dict):
    entries = list(struct.items())

    def arrange(named):
      return {k: named[k] for k, _ in entries}
  elif isinstance(struct, (list, tuple)):
    entries = [(t.name, t) for t in struct]

    def arrange(named):
      return [named[k] for k, _ in entries]
  else:
    entries = [(struct.name, struct)]

    def arrange(named):
      return named[entries[0][0]]
  names = [k for k, _ in entries]
  names += [k + inputs_lib.ROW_LENGTHS_SUFFIX for k, t in entries
            if inputs_lib.ragged_input(t)]
  if len(set(names)) != len(names):
    raise validation.invalid("dual", "a model whose inputs have unique names",
                             f"input names {names}")
  ragged = [k for k, t in entries if inputs_lib.ragged_input(t)]

  def rebuild(named):
    named = dict(named)
    for k in ragged:
      named[k] = inputs_lib.ragged_from_serving(
          named[k], named[k + inputs_lib.ROW_LENGTHS_SUFFIX])
    return arrange(named)
  return entries, rebuild


def _tensor_specs(entries):
  """{serving_name: tf.TensorSpec} with a variable batch dimension."""
  specs = {}
  for name, tensor in entries:
    shape = (None,) + tuple(tensor.shape[1:])
    specs[name] = tf.TensorSpec(shape, tf.as_dtype(tensor.dtype), name=name)
    if inputs_lib.ragged_input(tensor):
      lengths = name + inputs_lib.ROW_LENGTHS_SUFFIX
      specs[lengths] = tf.TensorSpec((None,), tf.int64, name=lengths)
  return specs


def _serving_examples(dual, examples, entries):
  """Warm-up examples keyed by serving name.

  A dict or array of arrays for a model without ragged inputs passes as
  given (`export_checks.check_warmup` checks it); the other forms the
  model takes (a list, ragged inputs, a Dataset) are read with
  `inputs.normalize`.
  """
  values = examples.values() if isinstance(examples, dict) else [examples]
  if not any(isinstance(v, (tf.data.Dataset, tf.RaggedTensor, list, tuple))
             for v in values) and not any(
                 inputs_lib.ragged_input(t) for _, t in entries):
    return examples
  x = inputs_lib.normalize(dual, examples, "warmup_examples").materialize()
  leaves = ([x[k] for k, _ in entries] if isinstance(x, dict)
            else tf.nest.flatten(x))
  named = {}
  for (name, _), leaf in zip(entries, leaves):
    if isinstance(leaf, tf.RaggedTensor):
      named.update(inputs_lib.ragged_to_serving(name, leaf,
                                                "warmup_examples"))
    else:
      named[name] = leaf
  return named


def _describe_specs(specs):
  return [{"name": name, "dtype": spec.dtype.name,
           "shape": [d if d is None else int(d) for d in spec.shape]}
          for name, spec in specs.items()]


# ---------------------------------------------------------------------------
# MC-dropout signature.


def _mc_statistic(samples, deterministic, statistic):
  """DPV of `samples` (T, N, ...) as the head's statistic defines it.

  Population std (divide by T). "predicted_class_std" takes the class the
  deterministic pass predicts; for one output unit every statistic is the
  std of that unit, shape (N,).
  """
  std = tf.math.reduce_std(samples, axis=0)
  flat = tf.reshape(std, [tf.shape(std)[0], -1])
  if statistic == contract.STAT_PREDICTED_CLASS_STD:
    classes = tf.argmax(tf.reshape(deterministic,
                                   [tf.shape(deterministic)[0], -1]), axis=-1)
    return tf.gather(flat, classes, axis=1, batch_dims=1)
  return flat


# ---------------------------------------------------------------------------
# Metadata.


def _head_metadata(dual):
  """What the head estimates: `variation_head_metadata` for dual models."""
  if heads.has_variation_head(dual):
    names = heads.dual_output_names(dual)  # several: one head per output
    return dict(heads.variation_head_metadata(dual)) if names is None else {
        "outputs": {n: heads.variation_head_metadata(dual, n) for n in names}}
  # Not made by `add_variation_head`: derive what the graph tells.
  return {"dropout_rates": heads.dropout_rates(dual)}


def _fit_report(head_metadata):
  """The head's fit report, or {output name: report} for several heads."""
  per_output = head_metadata.get("outputs")
  if per_output is None:
    return head_metadata.get("fit_report")
  return {name: meta.get("fit_report") for name, meta in per_output.items()}


def _out_of_range_metadata(head_metadata):
  """The out-of-range record of the heads (one for all), or None."""
  per_output = head_metadata.get("outputs")
  if per_output is not None:
    head_metadata = next(iter(per_output.values()), {})
  return head_metadata.get("out_of_range")


def _check_out_of_range(dual, head_metadata):
  """Refuses a dual whose "out_of_range" output was never calibrated.

  Before `fit_variation_head` sets its range the signal reads 0 for every
  input: served, it would call every input in range.
  """
  if (contract.OUT_OF_RANGE_KEY in dual.output and
      heads.has_variation_head(dual) and
      not (_out_of_range_metadata(head_metadata) or {}).get("fitted")):
    raise validation.invalid(
        "dual", f"a dual whose {contract.OUT_OF_RANGE_KEY!r} range was set "
        "by `fit_variation_head` (until then it reads 0 for every input)",
        f"model {dual.name!r} with an unfitted out-of-range signal")


def _build_metadata(dual, specs, head_metadata, mc, num_warmup):
  outputs = []
  for key in sorted(dual.output):
    tensor = dual.output[key]
    outputs.append({"name": key, "dtype": str(tensor.dtype),
                    "shape": [None] + [None if d is None else int(d)
                                       for d in tensor.shape[1:]]})
  signatures = [contract.SERVING_SIGNATURE, METADATA_SIGNATURE]
  if mc is not None:
    signatures.append(contract.MC_DROPOUT_SIGNATURE)
  return {
      "format": METADATA_FORMAT,
      "dropvar_tf_version": __version__,
      "tensorflow_version": tf.__version__,
      "keras_version": keras.__version__,
      "model_name": dual.name,
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "signatures": signatures,
      "output_keys": sorted(dual.output),
      "inputs": _describe_specs(specs),
      "outputs": outputs,
      "variation_head": head_metadata,
      # The head's self-assessment on held-out calibration inputs, at the
      # top level so that a reader of the export sees it first.
      "fit_report": _fit_report(head_metadata),
      # How "out_of_range" was calibrated; None when it is not an output.
      "out_of_range": (_out_of_range_metadata(head_metadata)
                       if contract.OUT_OF_RANGE_KEY in dual.output else None),
      "mc_dropout": mc,
      "warmup_requests": num_warmup,
  }


def read_export_metadata(path):
  """Returns the metadata dict of an export.

  Args:
    path: a version folder (`<export_base>/<version>`) or an export base, in
      which case the highest version is read.

  Returns:
    The dict written to `assets/dropvar_tf_metadata.json`: DPV statistic,
    num_samples and dropout rates under "variation_head", the head's
    "fit_report" (see `metrics.fit_report`; None for heads fitted without
    one), "out_of_range" (how that output was calibrated, None without
    it), versions, inputs, outputs, signatures, mc_dropout settings.

  Raises:
    FileNotFoundError: no export (or no metadata file) at `path`.
  """
  path = os.fspath(path)
  if not os.path.exists(os.path.join(path, "saved_model.pb")):
    versions = existing_versions(path)
    if not versions:
      raise FileNotFoundError(
          f"No SavedModel at {path!r} and no numeric version folder in it.")
    path = os.path.join(path, str(versions[-1]))
  filename = os.path.join(path, "assets", contract.METADATA_FILENAME)
  if not os.path.exists(filename):
    raise FileNotFoundError(
        f"{filename!r} does not exist: {path!r} was not written by "
        "dropvar_tf.export_saved_model.")
  with open(filename, encoding="utf-8") as f:
    return json.load(f)


# ---------------------------------------------------------------------------
# Version folders.


def _numbered_names(export_base, folders_only):
  """Sorted integers named by entries of `export_base` (ASCII digits).

  Numbers above `contract.MAX_VERSION` are left out, as TF Serving skips them.
  """
  if not os.path.isdir(export_base):
    return []
  numbers = []
  for name in os.listdir(export_base):
    if not (name.isascii() and name.isdigit()) or (
        int(name) > contract.MAX_VERSION):
      continue
    if not folders_only or os.path.isdir(os.path.join(export_base, name)):
      numbers.append(int(name))
  return sorted(numbers)


def existing_versions(export_base):
  """Sorted integer versions under `export_base` (temporary folders skipped)."""
  return _numbered_names(export_base, folders_only=True)


def _resolve_version(export_base, version):
  if version is None:
    # A file with a version's name takes that name too: the next is after it.
    taken = _numbered_names(export_base, folders_only=False)
    version = taken[-1] + 1 if taken else 1
    if version > contract.MAX_VERSION:
      raise validation.invalid(
          "version", "an explicit free version: the next after "
          f"{export_base!r}/{taken[-1]} is above TF Serving's largest "
          "(2**63 - 1)", None)
    return version
  version = validation.check_int(version, "version", 1)
  if version > contract.MAX_VERSION:
    raise validation.invalid(
        "version", "an integer in [1, 2**63 - 1] (TF Serving's versions are "
        "int64)", version)
  if os.path.exists(os.path.join(export_base, str(version))):
    raise FileExistsError(
        f"Version {version} already exists in {export_base!r}; versions are "
        "never overwritten. Pass another `version` (or None for the next).")
  return version


# ---------------------------------------------------------------------------
# Writing.


def _warmup_chunks(arrays):
  """Row indices of each warmup request: up to 4 near-equal slices."""
  batch = len(next(iter(arrays.values())))
  return np.array_split(np.arange(batch), min(batch, _MAX_WARMUP_REQUESTS))


def _write_warmup(saved_model_dir, arrays):
  """Writes PredictionLog records; returns how many."""
  chunks = _warmup_chunks(arrays)
  folder = os.path.join(saved_model_dir, WARMUP_DIRNAME)
  os.makedirs(folder, exist_ok=True)
  with tf.io.TFRecordWriter(os.path.join(folder, WARMUP_FILENAME)) as writer:
    for rows in chunks:
      request = predict_pb2.PredictRequest(
          model_spec=model_pb2.ModelSpec(
              signature_name=contract.SERVING_SIGNATURE))
      for name, array in arrays.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array[rows]))
      log = prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())
  return len(chunks)


def _write_json(filename, data):
  try:
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    with open(filename, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2, sort_keys=True)
      f.write("\n")
  except OSError as e:
    if e.filename is not None:
      raise
    # A full disk fails in write or close, which name no file.
    raise OSError(e.errno, e.strerror, filename) from e


def _fsync_tree(root):
  """Flushes every file and folder under `root` to disk (POSIX)."""
  for folder, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(folder, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder):
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:  # pragma: no cover - platforms without directory fds.
    return
  try:
    os.fsync(fd)
  except OSError:  # pragma: no cover - some file systems refuse it.
    pass
  finally:
    os.close(fd)


def _bucket_size(rows):
  """The next power of two >= rows (0 stays 0), as an int32 scalar.

  The nearest power of two by float64 log2, doubled when below `rows`:
  exact for every int32 (a plain ceil(log2) is off by one just above powers
  of two, where the float log rounds down).
  """
  count = tf.cast(rows, tf.float64)
  nearest = tf.pow(tf.constant(2.0, tf.float64),
                   tf.round(tf.math.log(count) / np.log(2.0)))
  bucket = tf.where(nearest < count, 2.0 * nearest, nearest)
  return tf.cast(bucket, tf.int32)


def _padded_to_bucket(compiled):
  """Runs `compiled` (an XLA function of an input dict) on requests padded
  to the next power of two rows (copies of their last row), and drops the
  padded rows from its outputs.

  XLA compiles one program per input shape: with the padding a server
  compiles at most ~log2(max batch) programs instead of one per batch size.
  """

  def forward(inputs):
    rows = tf.shape(next(iter(inputs.values())), out_type=tf.int32)[0]
    take = tf.minimum(tf.range(_bucket_size(rows)), rows - 1)
    padded = {name: tf.gather(x, take) for name, x in inputs.items()}
    outputs = compiled(padded)
    return {key: value[:rows] for key, value in outputs.items()}
  return forward


def _check_jit_compiles(compiled, specs):
  """Compiles the XLA forward pass once (batch 1): refuses what XLA can't."""
  example = {name: tf.zeros([1] + [1 if d is None else int(d)
                                  for d in spec.shape[1:]], spec.dtype)
             for name, spec in specs.items()}
  try:
    compiled(example)
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
          tf.errors.InternalError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else e
    raise validation.invalid(
        "jit_compile", "False for a model that XLA cannot compile (XLA "
        f"said: {first_line})", True) from e


# Head variables up to this many elements each (256 KiB of float32), and up
# to this many in all (4 MiB), smallest first, are served as constants of the
# serving graph; the others stay variables, so that the graph stays small
# whatever the head.
_MAX_CONSTANT_ELEMENTS = 65536
_MAX_CONSTANT_TOTAL = 1 << 20


def head_weight_values(dual):
  """[(variable, numpy value)] of the head's weights that serve as constants.

  Those of `heads.head_variables(dual)` (the variation head's, its probes'
  and the out-of-range signal's) of up to `_MAX_CONSTANT_ELEMENTS` elements,
  smallest first while their total stays within `_MAX_CONSTANT_TOTAL`; the
  others stay variables. [] for a model without a variation head. Read
  now: call it after fitting.
  """
  chosen, total = [], 0
  for v in sorted(heads.head_variables(dual),
                  key=lambda v: int(np.prod(v.shape))):
    size = int(np.prod(v.shape))
    if size > _MAX_CONSTANT_ELEMENTS or total + size > _MAX_CONSTANT_TOTAL:
      break
    chosen.append((v, v.numpy()))
    total += size
  return chosen


@contextlib.contextmanager
def constant_head(values):
  """Within it, a traced call of the dual reads `values`
  (`head_weight_values`) as graph constants instead of variables.

  A served request then reads none of the variables in `values`: at
  batch 1 each variable read is an op of its own (a handle and a read in a
  TF1 Session, an argument of an XLA program), and a head has a dozen or
  more small ones. The SavedModel still holds those variables, but the
  served graph does not read them. Variable assignments made during the
  traced call are dropped (the scope is stateless); a call with
  training=False makes none.
  """
  with keras.StatelessScope(state_mapping=[
      (variable, tf.constant(value)) for variable, value in values]):
    yield


def _unknown_values(dual):
  """{output key: the value it answers for an input it cannot judge}.

  Each variation: its head's cap (`VariationOutput.max_value`, what a NaN
  estimate becomes); "out_of_range": `OutOfRange.MAX_VALUE`. Empty for a
  model without a head of `add_variation_head` (no cap is known).
  """
  values = {}
  if not heads.has_variation_head(dual):
    return values
  for name in heads.dual_output_names(dual) or [None]:
    key = contract.variation_key(name)
    values[key] = float(heads.variation_output_layer(
        dual, name).max_value.numpy())
  if contract.OUT_OF_RANGE_KEY in dual.output:
    values[contract.OUT_OF_RANGE_KEY] = head_layers.OutOfRange.MAX_VALUE
  return values


def _flag_non_finite_rows(inputs, specs, outputs, values):
  """`outputs` with `values` in the rows of a NaN or infinite float input.

  A ReLU turns NaN into 0, so such an input can reach the head as ordinary
  activations, and get a small variation and an "out_of_range" of 0. In
  process every step refuses it (`inputs.normalize`); served, its row
  answers the head's cap and `OutOfRange.MAX_VALUE`: the largest
  uncertainty, not a confident one. The prediction is the model's own. Only
  dense float inputs are read (padding of a ragged input may be anything).
  Cost: two ops per float input (IsFinite, All) and a select per output.
  """
  finite = [tf.reduce_all(tf.math.is_finite(inputs[name]),
                          axis=list(range(1, inputs[name].shape.rank)))
            for name, spec in specs.items()
            if spec.dtype.is_floating and
            name + inputs_lib.ROW_LENGTHS_SUFFIX not in specs]
  if not finite or not values:
    return outputs
  ok = finite[0]
  for more in finite[1:]:
    ok = tf.logical_and(ok, more)
  flagged = dict(outputs)
  for key, value in values.items():
    out = outputs[key]
    row = ok if out.shape.rank == 1 else tf.reshape(
        ok, [-1] + [1] * (out.shape.rank - 1))
    flagged[key] = tf.where(row, out, tf.constant(value, out.dtype))
  return flagged


def _build_archive(dual, specs, rebuild, metadata_json, mc_model, num_samples,
                   seed, statistic, variation_shape, jit_compile=False):
  archive = keras.export.ExportArchive()
  archive.track(dual)
  head_values = head_weight_values(dual)

  caps = _unknown_values(dual)

  def serve(inputs):
    with constant_head(head_values):
      outputs = dual(rebuild(inputs), training=False)
    outputs = {key: outputs[key] for key in dual.output}
    return _flag_non_finite_rows(inputs, specs, outputs, caps)

  if jit_compile:
    compiled = tf.function(serve, jit_compile=True)
    _check_jit_compiles(compiled, specs)
    serve = _padded_to_bucket(compiled)

  archive.add_endpoint(contract.SERVING_SIGNATURE, serve,
                       input_signature=[specs])
  archive.add_endpoint(
      METADATA_SIGNATURE,
      lambda: {METADATA_OUTPUT_KEY: tf.constant(metadata_json)},
      input_signature=[])

  if mc_model is not None:
    archive.track(mc_model)

    def mc_dropout(inputs):
      deterministic = dual(rebuild(inputs), training=False)[
          contract.PREDICTION_KEY]
      # One tiled batch of T*N rows: one graph call instead of T. Row i of
      # tile t gets the masks `mc_dropout_targets` draws for example key i
      # and sample t, so a request reproduces the offline targets exactly.
      rows = tf.shape(next(iter(inputs.values())), out_type=tf.int64)[0]
      tiled = {name: tf.tile(x, [num_samples] + [1] * (x.shape.rank - 1))
               for name, x in inputs.items()}
      keys = tf.tile(tf.range(rows), [num_samples])
      sample = tf.repeat(tf.range(num_samples, dtype=tf.int64), rows)
      states = mask_hash.example_seeds(seed, keys, sample)
      with seeded_dropout.row_context(states):
        samples = mc_model(rebuild(tiled), training=False)
      samples = tf.reshape(
          samples, tf.concat([[num_samples, -1], tf.shape(samples)[1:]], 0))
      variation = _mc_statistic(samples, deterministic, statistic)
      variation = tf.reshape(variation, [-1] + variation_shape)
      return {contract.PREDICTION_KEY: tf.reduce_mean(samples, axis=0),
              contract.VARIATION_KEY: tf.cast(
                  variation, dual.output[contract.VARIATION_KEY].dtype)}

    archive.add_endpoint(contract.MC_DROPOUT_SIGNATURE, mc_dropout,
                         input_signature=[specs])
  return archive


def export_saved_model(dual, export_base, version=None, warmup_examples=None,
                       mc_num_samples=None, metadata=None, seed=0,
                       jit_compile=False):
  """Writes `dual` as `<export_base>/<version>/`, a SavedModel for TF Serving.

  Signatures:
    - "serving_default": named inputs (dict keys of the model's inputs, else
      the `keras.Input` names), batch size variable; a ragged input `name`
      is fed as `name` (rows padded to the longest, any padding value) and
      `name_row_lengths` (int64, one length per row); returns exactly
      the dual's outputs: {"prediction", "variation"} (per output name for
      several outputs), and "out_of_range" when the dual has it. Dropout is
      off (training=False), so the same request always gets the same
      answer. The head's weights are constants of this graph (those of
      up to 65536 elements, up to 2**20 in all, smallest first:
      `head_weight_values`; larger ones stay variables), so a request
      reads the base model's variables and no head weight of that size;
      the SavedModel's variables still hold every weight of `dual`, but
      changing a head weight served as a constant there does not change
      what this signature serves. A row with a NaN or infinite dense float
      input answers its head's cap as "variation" (and `1e30` as
      "out_of_range"), not an estimate (`_flag_non_finite_rows`).
    - "metadata": no inputs; returns {"metadata": scalar string}, the JSON
      also written to `assets/dropvar_tf_metadata.json`.
    - "mc_dropout" (when `mc_num_samples` is given): same inputs;
      `mc_num_samples` stochastic passes with dropout on and everything else
      in inference mode (`seeded_dropout.mc_dropout_model`); returns
      {"prediction": mean over passes, "variation": MC DPV with the head's
      statistic, shaped like "variation" of serving_default} (no
      "out_of_range": it does not depend on dropout). Row i of a
      request gets the masks `targets.mc_dropout_targets(..., seed=seed)`
      draws for example key i, so the answer equals the offline target of
      that request and is the same on every call. For auditing the one-pass
      estimate in place; it costs `mc_num_samples` forward passes.

  Side effects: `dual` is not changed. The export is written into a temporary
  folder `<export_base>/.tmp-<version>-<hex>`, checked (ops; then loaded as
  TF Serving loads it, a Session run by SignatureDef tensor names, with
  "serving_default" on the warm-up examples, or on one row of zeros,
  compared with `dual` in process: `export_checks.verify_serving_load`),
  flushed to disk, then renamed to `<export_base>/<version>`; on any error
  the temporary folder is removed and no version folder appears. A
  temporary folder left by a killed export is neither reused nor counted as
  a version.

  Args:
    dual: a built Functional `keras.Model` whose outputs are the dict
      {"prediction", "variation"}, as `add_variation_head` returns.
    export_base: the model's base path (what TF Serving's
      `--model_base_path` points at); created when missing. Local file
      systems only: the atomic rename needs POSIX semantics.
    version: positive integer; None takes the largest existing numeric
      version + 1 (1 when there is none).
    warmup_examples: optional inputs in any form the model takes
      (`inputs.normalize`: an array, a dict of arrays keyed by input name,
      a list, numpy strings, ragged, a Dataset), N examples; written as up
      to 4 PredictLog records in `assets.extra/tf_serving_warmup_requests`.
    mc_num_samples: optional integer >= 2: adds the "mc_dropout" signature.
    metadata: optional JSON-able dict merged over what `dual`'s head reports
      (`variation_head_metadata`) under "variation_head"; use it for models
      not made by `add_variation_head`. A "statistic" key must be one of
      `contract.STATISTICS`.
    seed: integer in [0, 2**32), seed of the "mc_dropout" masks.
    jit_compile: compile "serving_default" with XLA: one program instead
      of one TF op after another, at the price of one XLA launch per
      request. That tends to help small batches of small models and to
      hurt large batches, convolutions most (docs/measurements.md):
      measure your model (`bench/dual_bench.py`) before you choose it.
      Requests are padded to the next power of two rows and XLA compiles
      once per such size (warmup requests compile theirs at load), and
      once more per length of any inner dimension the model leaves
      variable (e.g. a sequence length). `tensorflow_model_server` runs it
      only with `--xla_cpu_compilation_enabled=true`. The export compiles
      a batch of 1 first and refuses a model XLA cannot compile.

  Returns:
    The path of the new version folder.

  Raises:
    ValueError: invalid arguments (`dual` None, not a Keras model, outputs not
      the contract dict, an "out_of_range" output whose range was never
      set by `fit_variation_head`; bad `version`, `mc_num_samples`,
      `metadata` or warmup examples that do not match the inputs), the
      graph uses ops a stock TF Serving lacks, the export does not load or
      answer as `dual` does when loaded as TF Serving loads it, or
      `jit_compile` with a model XLA cannot compile.
    FileExistsError: the version folder already exists.

  Example:
  >>> path = export_saved_model(dual, "/models/movielens", warmup_examples=x)
  >>> served = tf.saved_model.load(path).signatures["serving_default"]
  """
  dual = export_checks.check_dual(dual)
  export_base = export_checks.check_export_base(export_base)
  if mc_num_samples is not None:
    mc_num_samples = validation.check_int(mc_num_samples, "mc_num_samples", 2)
  seed = validation.check_int(seed, "seed", 0)
  if not isinstance(jit_compile, (bool, np.bool_)):
    raise validation.invalid("jit_compile", "True or False", jit_compile)
  jit_compile = bool(jit_compile)
  if seed >= 2**32:
    raise validation.invalid("seed", "an integer in [0, 2**32)", seed)
  head_metadata = _head_metadata(dual)
  _check_out_of_range(dual, head_metadata)
  head_metadata.update(export_checks.check_metadata(metadata))
  entries, rebuild = _input_entries(dual)
  specs = _tensor_specs(entries)
  warmup = (None if warmup_examples is None else export_checks.check_warmup(
      _serving_examples(dual, warmup_examples, entries), specs))
  version = _resolve_version(export_base, version)

  mc, mc_model, statistic, variation_shape = None, None, None, None
  if mc_num_samples is not None:
    if contract.output_names(dual.output):
      raise validation.invalid("mc_num_samples", "None for a dual of several "
                               "outputs (mc_dropout has one)", mc_num_samples)
    prediction = dual.output[contract.PREDICTION_KEY]
    base = keras.Model(dual.input, prediction)
    if not sources.find_sources(base):
      raise validation.invalid(
          "mc_num_samples", "None for a model without dropout sources "
          "before its prediction", mc_num_samples)
    units = int(np.prod(prediction.shape[1:])) if prediction.shape[1:] else 1
    statistic = validation.resolve_statistic(
        head_metadata.get("statistic", contract.STAT_AUTO), units,
        keras_graph.output_is_probabilities(base))
    variation_shape = [int(d) for d in
                       dual.output[contract.VARIATION_KEY].shape[1:]]
    mc_model = seeded_dropout.mc_dropout_model(base)
    mc = {"num_samples": mc_num_samples, "seed": seed,
          "statistic": statistic, "std": "population (divide by T)",
          "masks": "dropvar_tf.mask_hash mask function, example key = row "
                   "index in the request"}

  num_warmup = 0 if warmup is None else len(_warmup_chunks(warmup))
  metadata_dict = _build_metadata(dual, specs, head_metadata, mc, num_warmup)
  metadata_dict["jit_compile"] = jit_compile
  metadata_json = json.dumps(metadata_dict, sort_keys=True)

  os.makedirs(export_base, exist_ok=True)
  target = os.path.join(export_base, str(version))
  tmp = os.path.join(export_base,
                     f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:12]}")
  try:
    archive = _build_archive(dual, specs, rebuild, metadata_json, mc_model,
                             mc_num_samples, seed, statistic, variation_shape,
                             jit_compile=jit_compile)
    archive.write_out(tmp, verbose=False)
    _write_json(os.path.join(tmp, "assets", contract.METADATA_FILENAME),
                metadata_dict)
    if warmup is not None:
      _write_warmup(tmp, warmup)
    export_checks.check_serving_ops(tmp)
    export_checks.verify_serving_load(
        tmp, dual, rebuild,
        export_checks.example_inputs(specs) if warmup is None else warmup)
    _fsync_tree(tmp)
    if os.path.exists(target):
      raise FileExistsError(
          f"Version {version} appeared in {export_base!r} during the export; "
          "versions are never overwritten.")
    try:
      # Fails (ENOTEMPTY/EEXIST) when a concurrent export won the race.
      os.rename(tmp, target)
    except OSError as e:
      raise FileExistsError(
          f"Could not publish version {version} in {export_base!r}: {e}") from e
    _fsync_dir(export_base)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target
