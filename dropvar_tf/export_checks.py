"""The checks an export passes before `export_saved_model` publishes it.

Argument checks (the dual model, the export base, metadata, warm-up
examples), the op check (`check_serving_ops`: every op exists in a stock
`tensorflow_model_server`), and `verify_serving_load`: the written folder
loaded the way TF Serving loads it, a SavedModelBundle (the "serve" tag in a
`tf.compat.v1.Session`, signatures run by their SignatureDef tensor names,
warm-up records replayed), with "serving_default" compared against the dual
model in process. TF2's `tf.saved_model.load` runs the object graph instead,
so an export can load there and still fail in TF Serving.
"""

import json
import os

import numpy as np
from tensorflow.core.protobuf import saved_model_pb2

from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf import validation
from dropvar_tf._keras import tf

# Ops that exist in the Python TensorFlow runtime but not in a stock
# `tensorflow_model_server`: they call back into a Python interpreter.
DENIED_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})


def check_dual(dual):
  """Checks that `dual` is a dual model with the contract's outputs.

  Args:
    dual: what `export_saved_model` was given.

  Returns:
    `dual`.

  Raises:
    ValueError: not a built Keras model, or its outputs are neither the dict
      {"prediction", "variation"} nor the per-output keys of a dual of a
      multi-output model (`contract.output_keys`).
  """
  validation.check_model(dual, arg="dual")
  outputs = dual.output
  if not isinstance(outputs, dict) or contract.output_names(outputs) is None:
    received = (sorted(outputs) if isinstance(outputs, dict)
                else f"{len(dual.outputs)} unnamed output(s)")
    raise validation.invalid(
        "dual",
        f"a dual model whose outputs are a dict with keys "
        f"{list(contract.OUTPUT_KEYS)} or `contract.output_keys(names)` "
        f"(build it with `dropvar_tf.add_variation_head`)",
        f"model {dual.name!r} with outputs {received}")
  return dual


def check_export_base(export_base):
  """Checks an export base path.

  Args:
    export_base: a path (str or os.PathLike).

  Returns:
    The path as a str.

  Raises:
    ValueError: empty, not a path, an existing file or under one, or in a
      folder this process cannot write (e.g. a read-only mount): said
      before anything is built.
  """
  if not isinstance(export_base, (str, os.PathLike)) or not os.fspath(
      export_base):
    raise validation.invalid("export_base", "a non-empty directory path",
                             export_base)
  path = os.fspath(export_base)
  if os.path.exists(path) and not os.path.isdir(path):
    raise validation.invalid("export_base", "a directory path",
                             f"{path!r} (an existing file)")
  if os.path.islink(path) and not os.path.exists(path):
    raise validation.invalid("export_base", "a directory path",
                             f"{path!r} (a symlink to nothing)")
  # The nearest folder that exists must be one this process can write in
  # (symlinks resolved, as the writes will resolve them).
  existing = os.path.realpath(path)
  while not os.path.exists(existing):
    parent = os.path.dirname(existing)
    if parent == existing:
      break
    existing = parent
  if not os.path.isdir(existing):
    raise validation.invalid("export_base", "a directory path",
                             f"{path!r} (under the file {existing!r})")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise validation.invalid(
        "export_base", "a directory this process can write in",
        f"{path!r} ({existing!r} is not writable: permissions or a "
        "read-only file system)")
  return path


def check_metadata(metadata):
  """Checks the user metadata merged into the export's head metadata.

  Args:
    metadata: None or a JSON-able dict with string keys.

  Returns:
    A copy of the dict ({} for None).

  Raises:
    ValueError: not a dict of string keys, not JSON-able, or a "statistic"
      outside `contract.STATISTICS`.
  """
  if metadata is None:
    return {}
  if not isinstance(metadata, dict) or not all(
      isinstance(k, str) for k in metadata):
    raise validation.invalid("metadata", "a dict with string keys", metadata)
  try:
    json.dumps(metadata, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise validation.invalid("metadata", f"a JSON-serializable dict ({e})",
                             metadata) from e
  statistic = metadata.get("statistic", contract.STAT_AUTO)
  if statistic not in contract.STATISTICS:
    raise validation.invalid("metadata", f"a 'statistic' in "
                             f"{contract.STATISTICS}", metadata)
  return dict(metadata)


def check_warmup(warmup_examples, specs):
  """Returns {serving_name: np.ndarray} cast to the input dtypes.

  Args:
    warmup_examples: an array (single-input models) or a dict of arrays
      keyed by input name.
    specs: {serving_name: tf.TensorSpec} of the model inputs.

  Returns:
    {serving_name: np.ndarray}, one batch size for all.

  Raises:
    ValueError: the examples do not match the model inputs (names, rank,
      fixed dimensions, dtype kind or batch size), or float values are NaN
      or infinite.
  """
  arg = "warmup_examples"
  if not isinstance(warmup_examples, dict):
    if len(specs) != 1:
      raise validation.invalid(
          arg, f"a dict of arrays keyed by the input names {list(specs)}",
          type(warmup_examples).__name__)
    warmup_examples = {next(iter(specs)): warmup_examples}
  missing = sorted(set(specs) - set(warmup_examples))
  extra = sorted(set(warmup_examples) - set(specs))
  if missing or extra:
    raise validation.invalid(
        arg, f"arrays for exactly the inputs {list(specs)} (missing "
        f"{missing}, unexpected {extra})", sorted(warmup_examples))
  arrays = {}
  batch = None
  for name, spec in specs.items():
    try:
      array = np.asarray(warmup_examples[name])
    except (TypeError, ValueError) as e:
      raise validation.invalid(arg, f"an array for input {name!r}",
                               type(warmup_examples[name]).__name__) from e
    want = spec.dtype
    ok_kind = (
        (want.is_integer and array.dtype.kind in "iub") or
        (want.is_floating and array.dtype.kind in "iuf") or
        (want.is_bool and array.dtype.kind == "b") or
        (want == tf.string and array.dtype.kind in "SUO"))
    if not ok_kind:
      raise validation.invalid(
          arg, f"input {name!r} of dtype {want.name}",
          f"array of dtype {array.dtype}")
    shape = list(spec.shape)
    if array.ndim != len(shape) or any(
        d is not None and d != a for d, a in zip(shape[1:], array.shape[1:])):
      raise validation.invalid(
          arg, f"input {name!r} of shape {[None] + shape[1:]}",
          f"array of shape {list(array.shape)}")
    if array.shape[0] < 1 or (batch is not None and array.shape[0] != batch):
      raise validation.invalid(
          arg, "a non-empty batch of the same size for every input",
          f"input {name!r} with {array.shape[0]} examples"
          + ("" if batch is None else f" (others have {batch})"))
    batch = array.shape[0]
    if want == tf.string:
      arrays[name] = array.astype(object)
    else:
      arrays[name] = array.astype(want.as_numpy_dtype)
      if want.is_floating and array.size:
        bad = ~np.isfinite(arrays[name].reshape(batch, -1)).all(axis=1)
        if bad.any():
          raise validation.invalid(
              arg, "finite values (no NaN or Inf)",
              f"{int(bad.sum())} of {batch} rows of input {name!r} with NaN "
              "or Inf values")
  return arrays


def _graph_ops(saved_model_dir):
  """Op types used by the SavedModel's graphs and function library."""
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  ops, functions = set(), set()
  for meta_graph in proto.meta_graphs:
    graph = meta_graph.graph_def
    ops.update(node.op for node in graph.node)
    for function in graph.library.function:
      functions.add(function.signature.name)
      ops.update(node.op for node in function.node_def)
  # A node may call a library function by name; that is not an op type.
  return ops - functions


def check_serving_ops(saved_model_dir):
  """Checks that a stock TF Serving of this TF version can run the graph.

  Every op must be registered in this TensorFlow, be part of its public op
  set (`tf.raw_ops`; custom ops loaded from .so libraries are not) or be an
  internal "_" op, and not call back into Python (py_func, EagerPyFunc).

  Args:
    saved_model_dir: folder holding `saved_model.pb`.

  Returns:
    The sorted list of op types used.

  Raises:
    ValueError: naming the offending ops.
  """
  ops = _graph_ops(saved_model_dir)
  public = set(dir(tf.raw_ops))
  denied = sorted(ops & DENIED_OPS)
  unregistered = sorted(o for o in ops if not keras_graph.is_registered_op(o))
  custom = sorted(o for o in ops - DENIED_OPS - set(unregistered)
                  if o not in public and not o.startswith("_"))
  problems = []
  if denied:
    problems.append(f"ops that call Python (absent from TF Serving): {denied}")
  if unregistered:
    problems.append(f"ops not registered in TensorFlow {tf.__version__}: "
                    f"{unregistered}")
  if custom:
    problems.append(f"custom ops (not in tf.raw_ops, e.g. loaded from a .so "
                    f"library): {custom}")
  if problems:
    raise ValueError(
        "The exported graph cannot run on a stock TF Serving: it uses "
        + "; ".join(problems) + ". Replace them with TensorFlow ops (no "
        "tf.py_function / tf.numpy_function in the model).")
  return sorted(ops)


def example_inputs(specs):
  """One example row built from the input specs (zeros, empty strings).

  Args:
    specs: {serving_name: tf.TensorSpec}, batch dimension first.

  Returns:
    {serving_name: np.ndarray} of batch size 1; a variable inner dimension
    gets size 1.
  """
  arrays = {}
  for name, spec in specs.items():
    shape = [1] + [1 if d is None else int(d) for d in spec.shape[1:]]
    if spec.dtype == tf.string:
      arrays[name] = np.full(shape, b"", dtype=object)
    else:
      arrays[name] = np.zeros(shape, spec.dtype.as_numpy_dtype)
  return arrays


def _close(expected, got):
  """Whether a served output equals the in-process one up to float32
  rounding (the Session may fuse or reorder the same ops)."""
  expected = np.asarray(expected)
  got = np.asarray(got)
  if expected.shape != got.shape:
    return False
  if expected.dtype.kind not in "fc":
    return np.array_equal(expected, got)
  expected = expected.astype(np.float64)
  scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
  eps = float(np.finfo(np.float32).eps)
  return bool(np.allclose(got.astype(np.float64), expected,
                          rtol=64 * eps, atol=64 * eps * scale,
                          equal_nan=True))


def verify_serving_load(saved_model_dir, dual, rebuild, inputs):
  """Loads an export the way TF Serving does and checks its answers.

  The folder is loaded as `dropvar_tf.serving.bundle.SavedModelBundle`
  loads it (the "serve" MetaGraph into a `tf.compat.v1.Session`, warm-up
  records replayed through the signatures by their tensor names), then
  "serving_default" runs on `inputs` and must return what `dual` returns
  in process, up to float32 rounding. The Session is closed afterwards.

  The serving package is imported here, not at module import: the library
  does not depend on the server otherwise, and `dropvar_tf.serving` imports
  the library.

  Args:
    saved_model_dir: the written (unpublished) export folder.
    dual: the exported Keras model.
    rebuild: a function from {serving_name: tensor} to `dual`'s input
      structure.
    inputs: {serving_name: np.ndarray} to run, one batch size for all.

  Raises:
    ValueError: the folder does not load in a Session, a warm-up record
      fails, "serving_default" is missing, or an output differs from the
      in-process dual (naming the output and the largest difference).
  """
  from dropvar_tf.serving import bundle

  try:
    loaded = bundle.SavedModelBundle(0, saved_model_dir)
  except Exception as e:
    raise ValueError(
        "The export does not load the way TF Serving loads it (the \"serve\" "
        "MetaGraph into a tf.compat.v1.Session, warm-up records replayed): "
        f"{type(e).__name__}: {e}") from e
  try:
    try:
      fn, _, _ = loaded.signature(contract.SERVING_SIGNATURE)
      served = fn(**inputs)
    except Exception as e:
      raise ValueError(
          f"Signature {contract.SERVING_SIGNATURE!r} of the export fails when "
          "run in a tf.compat.v1.Session by its SignatureDef tensor names: "
          f"{type(e).__name__}: {e}") from e
  finally:
    loaded.close()
  expected = dual(rebuild({name: tf.constant(array)
                           for name, array in inputs.items()}),
                  training=False)
  for key in sorted(expected):
    want = np.asarray(expected[key])
    got = served.get(key)
    if got is None:
      detail = "is missing"
    elif np.shape(got) != want.shape:
      detail = (f"has shape {list(np.shape(got))} (in process "
                f"{list(want.shape)})")
    elif not _close(want, got):
      difference = np.nanmax(np.abs(np.asarray(got, np.float64) - want))
      detail = f"differs from the in-process model by up to {difference:.3g}"
    else:
      continue
    raise ValueError(
        f"Output {key!r} of signature {contract.SERVING_SIGNATURE!r}, run "
        f"as TF Serving runs it (a tf.compat.v1.Session), {detail} on "
        f"{len(next(iter(inputs.values())))} example(s).")
