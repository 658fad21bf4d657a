"""Offline Monte Carlo dropout targets: the DPV a variation head learns.

The dropout prediction variation (DPV) of an example is the std, over
`num_samples` stochastic forward passes with dropout on, of the model's
prediction (see `dropvar_tf.contract` for the statistics). This module computes
it for a whole data set, fast and reproducibly:

* Only dropout is sampled, every source of it (`sources.dropout_sources`:
  Dropout, attention and RNN dropout, GaussianDropout, AlphaDropout and
  registered layers, at any depth): the passes run
  `seeded_dropout.mc_dropout_model`, which shares every weight, keeps
  BatchNormalization in inference mode and leaves the base model untouched.
* Targets that are all exactly 0 raise a `RuntimeWarning` naming the likely
  cause (no active source, or sources that cannot change the output).
* The passes are compiled and tiled: each batch is repeated `samples_per_pass`
  times inside one `tf.function` call, and only float64 sums and sums of
  squares are kept on the host, never all T outputs.
* Masks are a pure function of numbers (specified in `dropvar_tf.mask_hash`),
  so the masks do not depend on batching, tiling, chunking, sharding or
  resuming: a distributed (e.g. Apache Beam) pipeline that feeds the same
  keys draws exactly the same masks. With the same batch shape the targets
  are bit-identical; across batch shapes they agree to float32 rounding (TF's
  matmul kernels round differently per shape), about 1e-7 relative.
* The mask hash (about 20 uint32 ops per unit) runs as one XLA-fused kernel
  inside `mc_dropout_targets`, so seeded masks cost less than Keras' own
  random dropout; the rest of the model keeps TF's kernels.
* With `output_path`, finished chunks of examples are kept as resumable files
  (`dropvar_tf.target_store`).

How many samples are enough: `metrics.mc_convergence` (split-half
reliability) and `metrics.noise_ceiling`, built on `split_half_targets` and
`mc_dropout_targets`.

Example:

```python
targets = mc_dropout_targets(model, x, num_samples=100, seed=0)
half_a, half_b, full = split_half_targets(model, x, num_samples=100)
```
"""

import collections
import hashlib
import json
import os
import sys
import warnings

import numpy as np

from dropvar_tf import inputs
from dropvar_tf import keras_graph
from dropvar_tf import mask_hash
from dropvar_tf import seeded_dropout
from dropvar_tf import sources
from dropvar_tf import target_outputs
from dropvar_tf import target_store
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

# Tiled rows per compiled call when `samples_per_pass` is automatic: large
# enough to amortise the call overhead, small enough that activations of a
# wide MLP stay well under a GiB.
TILE_ROWS = 16384
# Examples per resume chunk file (rounded up to a multiple of `batch_size`).
CHUNK_EXAMPLES = 8192
# `progress=None` shows a bar when num_examples * num_samples exceeds this.
PROGRESS_MIN_ROWS = 2_000_000


# ---------------------------------------------------------------------------
# Inputs.


class _Source:
  """The inputs `x` (`inputs.normalize`: every form a model takes), read in
  chunks of examples."""

  def __init__(self, model, x):
    self.inputs = inputs.normalize(model, x)
    self.num_examples = self.inputs.num_examples
    self.spec = x.element_spec if isinstance(x, tf.data.Dataset) else None

  def fingerprint(self):
    if self.spec is not None:
      # Hashing the data needs a full pass; each chunk file stores the
      # digest of its own inputs instead, checked when resuming.
      return "dataset:" + hashlib.sha256(
          repr(self.spec).encode()).hexdigest()
    digest = hashlib.sha256(b"arrays")
    target_store.hash_structure(digest, inputs.hashable(self.inputs.x))
    return digest.hexdigest()

  def chunks(self, chunk_rows):
    start = 0
    for chunk in self.inputs.batches(chunk_rows):
      stop = start + inputs.num_rows(chunk)
      yield start, stop, chunk
      start = stop


def _without_names(value):
  """`value` with every "name" entry of its (nested) dicts left out."""
  if isinstance(value, dict):
    return {k: _without_names(v) for k, v in value.items() if k != "name"}
  if isinstance(value, (list, tuple)):
    return [_without_names(v) for v in value]
  return value


def _type_name(value):
  """What a config value JSON cannot hold is hashed as: its type's name.

  Never its repr, which may hold a memory address that differs from
  process to process (a Beam worker must get the launcher's fingerprint).
  """
  return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _layer_config(layer):
  """A layer's config as canonical JSON, names left out at every depth.

  Containers (models) give their class only: their layers are walked one by
  one. A layer whose `get_config` cannot run (a custom layer with
  constructor arguments and no `get_config`) or whose config JSON cannot
  hold gives its class only.
  """
  kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
  if isinstance(layer, keras.Model):
    return kind
  try:
    config = _without_names(dict(layer.get_config()))
    return kind + json.dumps(config, sort_keys=True, default=_type_name)
  except Exception:  # pylint: disable=broad-except
    return kind


def model_fingerprint(model):
  """sha256 of what the targets of `model` depend on.

  That is every layer's class and config (activations, rates, shapes; layer
  names left out, also those of wrapped layers, so a model rebuilt under
  other names matches), its dropout
  sources (kind and rate, in sampling order) and every weight (values,
  shapes, dtypes, in model order). A resumed run with another architecture,
  dropout rate or weights is refused.
  """
  digest = hashlib.sha256()
  for layer in keras_graph.all_layers(model):
    digest.update(_layer_config(layer).encode())
  for found in sources.find_sources(model):
    digest.update(f"|{found.kind}:{found.rate!r}".encode())
  for w in model.weights:
    value = np.ascontiguousarray(w.numpy())
    digest.update(f"{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


# ---------------------------------------------------------------------------
# Compiled sampling.


class _Sampler:
  """Compiled deterministic pass and tiled stochastic passes of one model.

  Built once per (model, samples_per_pass) and cached: seed and sample
  indices are tensor arguments, so later calls reuse the traced graphs.
  """

  def __init__(self, model, samples_per_pass, names=None):
    self.model = model
    self.names = names
    self.clone = seeded_dropout.mc_dropout_model(model)
    self.samples_per_pass = samples_per_pass
    self.deterministic = tf.function(self._deterministic,
                                     reduce_retracing=True)
    self.sample_sums = tf.function(self._sample_sums, reduce_retracing=True)

  def _flat(self, y):
    """(B, k): every output (in `names` order) flattened side by side."""
    if self.names is None:
      return tf.reshape(y, [tf.shape(y)[0], -1])
    return tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in
                      keras_graph.select_outputs(y, self.names)], axis=1)

  def _deterministic(self, x):
    return self._flat(self.model(x, training=False))

  def _sample_sums(self, x, keys, shift, seed, first_sample, num_valid):
    """Sums over `samples_per_pass` tiled samples starting at `first_sample`.

    Args:
      x: input structure, (B, ...) leaves.
      keys: (B,) int64 example keys.
      shift: (B, k) float64, subtracted before summing (the deterministic
        prediction) so that sums of squares keep their precision.
      seed: uint32 scalar, the global seed.
      first_sample: int32 scalar, sample index of the first tile.
      num_valid: int32 scalar, tiles beyond it (past num_samples) are ignored.

    Returns:
      (sum, sum of squares) of the shifted outputs, each (B, k) float64.
    """
    s = self.samples_per_pass
    rows = tf.shape(keys)[0]
    tiled = inputs.tile_rows(x, s)
    sample = tf.repeat(first_sample + tf.range(s), rows)
    states = mask_hash.example_seeds(seed, tf.tile(keys, [s]), sample)
    with seeded_dropout.row_context(states):
      y = self._flat(self.clone(tiled, training=False))
    y = tf.reshape(tf.cast(y, tf.float64), [s, rows, -1]) - shift[None]
    weight = tf.cast(tf.range(s) < num_valid, tf.float64)[:, None, None]
    y = y * weight
    return tf.reduce_sum(y, axis=0), tf.reduce_sum(tf.square(y), axis=0)

  def moments(self, x, keys, seed, sample_start, sample_stop):
    """Deterministic output and float64 moment sums for one batch.

    Returns:
      (det, s1, s2): (B, k) deterministic prediction and sums of (y - det)
      and (y - det)**2 over samples [sample_start, sample_stop).
    """
    x = inputs.to_tensors(x)
    keys = tf.convert_to_tensor(keys, tf.int64)
    det = self.deterministic(x).numpy().astype(np.float64)
    shift = tf.constant(det)
    seed = tf.constant(seed, tf.uint32)
    s1 = np.zeros_like(det)
    s2 = np.zeros_like(det)
    for t in range(sample_start, sample_stop, self.samples_per_pass):
      valid = min(self.samples_per_pass, sample_stop - t)
      a, b = self.sample_sums(x, keys, shift, seed, tf.constant(t, tf.int32),
                              tf.constant(valid, tf.int32))
      s1 += a.numpy()
      s2 += b.numpy()
    return det, s1, s2


# Recently used samplers, keyed by model identity; a few only, since each
# holds its model (and traced graphs) alive.
_SAMPLERS = collections.OrderedDict()
_MAX_SAMPLERS = 4


def _sampler_for(model, samples_per_pass, names=None):
  key = (id(model), samples_per_pass)
  sampler = _SAMPLERS.get(key)
  if sampler is None or sampler.model is not model:
    sampler = _Sampler(model, samples_per_pass, names)
    _SAMPLERS[key] = sampler
    while len(_SAMPLERS) > _MAX_SAMPLERS:
      _SAMPLERS.popitem(last=False)
  _SAMPLERS.move_to_end(key)
  return sampler


# ---------------------------------------------------------------------------
# Validation.


def spec_model(model):
  """`model`, or a Functional wrapper giving a subclassed one inputs/outputs.

  Raises:
    ValueError: `model` is not a built Keras model with a dropout source,
      or its `call` skips a dropout source with training off.
  """
  sources.check_dropout_model(model, allow_subclassed=True)
  try:
    spec = keras_graph.as_functional(model)
  except ValueError as e:
    raise validation.invalid("model", "a built model", str(e)) from e
  if spec is not model:
    try:
      view, _ = keras_graph.functional_view(model)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
      view = None  # A `call` Keras cannot trace: its sources are run as is.
    if view is not None:
      sources.check_called_sources(model, view)
  return spec


def _check_common(model, num_samples, seed, batch_size, statistic):
  num_samples = validation.check_int(num_samples, "num_samples", 2)
  seed = validation.check_int(seed, "seed", 0)
  if seed >= 2**32:
    raise validation.invalid("seed", "an integer in [0, 2**32)", seed)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  return num_samples, seed, batch_size, target_outputs.resolve(model, statistic)


def _check_keys(keys, num_examples):
  if keys is None:
    return None
  keys = np.asarray(keys)
  if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer) or (
      num_examples is not None and keys.shape[0] != num_examples):
    raise validation.invalid(
        "keys", f"a 1-D integer array with one key per example "
        f"({num_examples})", f"array of dtype {keys.dtype} and shape "
        f"{keys.shape}")
  if keys.dtype == np.uint64 and keys.size and keys.max() > np.iinfo(
      np.int64).max:
    raise validation.invalid("keys", "int64 keys", "uint64 keys >= 2**63")
  return keys.astype(np.int64)


def _auto_samples_per_pass(samples_per_pass, num_samples, batch_rows):
  if samples_per_pass is None:
    limit = max(1, min(num_samples, TILE_ROWS // max(1, batch_rows)))
  else:
    limit = min(num_samples, validation.check_int(
        samples_per_pass, "samples_per_pass", 1))
  # Even tiles: T=100 with room for 64 runs 2 x 50, not 64 + 36.
  passes = -(-num_samples // limit)
  return -(-num_samples // passes)


def _progress_bar(progress, num_examples, num_samples, desc):
  if progress is None:
    progress = (num_examples or 0) * num_samples >= PROGRESS_MIN_ROWS
  if not progress:
    return None
  import tqdm
  return tqdm.tqdm(total=num_examples, unit="ex", desc=desc, file=sys.stderr)


# ---------------------------------------------------------------------------
# The engine: chunks of examples, batches inside, moments per sample range.


def _pad_rows(x, keys, rows):
  """Repeats the last row so the batch has `rows` rows (one trace only)."""
  n = keys.shape[0]
  if n == rows:
    return x, keys
  idx = np.concatenate([np.arange(n), np.full(rows - n, n - 1)])
  return inputs.take_rows(x, idx), keys[idx]


def _compute_chunk(sampler, x, keys, seed, batch_rows, sample_ranges):
  """Moments of one chunk of examples for each (start, stop) sample range.

  Returns:
    (det, [(s1, s2), ...]) with (n, k) float64 arrays.
  """
  n = keys.shape[0]
  dets, sums = [], [([], []) for _ in sample_ranges]
  for b in range(0, n, batch_rows):
    stop = min(b + batch_rows, n)
    xb, kb = _pad_rows(inputs.slice_rows(x, b, stop), keys[b:stop],
                       batch_rows)
    for (start, end), (l1, l2) in zip(sample_ranges, sums):
      det, s1, s2 = sampler.moments(xb, kb, seed, start, end)
      l1.append(s1[:stop - b])
      l2.append(s2[:stop - b])
    dets.append(det[:stop - b])
  return np.concatenate(dets), [(np.concatenate(a), np.concatenate(b))
                                for a, b in sums]


def _run(model, source, num_samples, seed, batch_size, keys,
         samples_per_pass, progress, sample_ranges, desc, on_chunk=None,
         chunk_rows=None, names=None):
  """Yields (index, start, stop, x, keys, result) per chunk of examples.

  `result` is `on_chunk(index, start, stop, x, keys)` when that is not None
  (a reused chunk), else `_compute_chunk(...)`.
  """
  batch_rows = batch_size
  if source.num_examples is not None:
    batch_rows = max(1, min(batch_size, source.num_examples))
  spp = _auto_samples_per_pass(samples_per_pass, num_samples, batch_rows)
  sampler = _sampler_for(model, spp, names)
  bar = _progress_bar(progress, source.num_examples, num_samples, desc)
  chunk_rows = chunk_rows or batch_size * max(1, -(-CHUNK_EXAMPLES //
                                                   batch_size))
  try:
    for index, (start, stop, xc) in enumerate(source.chunks(chunk_rows)):
      if keys is None:
        kc = np.arange(start, stop, dtype=np.int64)
      else:
        if stop > keys.shape[0]:
          raise validation.invalid(
              "keys", "one key per example", f"{keys.shape[0]} keys for at "
              f"least {stop} examples")
        kc = keys[start:stop]
      result = on_chunk(index, start, stop, xc, kc) if on_chunk else None
      if result is None:
        result = _compute_chunk(sampler, xc, kc, seed, batch_rows,
                                sample_ranges)
      yield index, start, stop, xc, kc, result
      if bar is not None:
        bar.update(stop - start)
  finally:
    if bar is not None:
      bar.close()


# ---------------------------------------------------------------------------
# Public API.


def mc_dropout_targets(model, x, num_samples=100, seed=0, batch_size=256,
                       statistic="auto", keys=None, output_path=None,
                       progress=None, samples_per_pass=None):
  """Computes MC-dropout DPV targets for every example of `x`.

  Runs `num_samples` stochastic passes (every dropout source on with the
  model's rates, everything else in inference mode, `model` untouched) and
  returns the std over passes per example. Passes are compiled and tiled;
  only float64 sums are accumulated.

  Args:
    model: built `keras.Model` (Functional, Sequential or subclassed) with
      at least one dropout source (`sources.dropout_sources`; nested and
      subclassed models and custom layers inside it included) and one
      output tensor of shape (batch, k) (or (batch,)), or a list or flat
      dict of them (see Returns).
    x: the inputs, no labels: a numpy array (N, ...), a list or dict of
      arrays (named inputs, e.g. int64 `user_id`/`movie_id`), or a
      `tf.data.Dataset` yielding single examples or batches (told apart by
      rank against the model's inputs; rebatched to `batch_size`).
    num_samples: integer >= 2, T.
    seed: integer in [0, 2**32), the global seed of the mask function.
    batch_size: examples per compiled call (before tiling).
    statistic: one of `contract.STATISTICS`; "auto" is "std" for one output
      unit and "predicted_class_std" otherwise. For several outputs it is
      resolved per output, or given per output as a dict keyed by name.
    keys: optional (N,) int64 example keys (default: row index 0..N-1).
      Masks depend on (seed, key, sample, layer, unit) only: give matching
      keys to reproduce a part of `x` in another call or shard.
    output_path: optional directory for resumable chunk files and a manifest;
      re-running with the same settings reuses valid chunks.
    progress: show a tqdm bar (None: only for long runs).
    samples_per_pass: tiles per compiled call (None: as many as fit in
      `TILE_ROWS` rows, balanced over the passes).

  Returns:
    float32 array: (N,) for "std" with one output unit and for
    "predicted_class_std"; (N, k) for "std"/"per_class_std" with k > 1.
    Population std (ddof=0). For a model with several outputs, a dict of
    such arrays keyed by output name (`keras_graph.output_names`: the
    dict keys, the Keras output names of a list, or "output_<i>").

  Raises:
    ValueError: an invalid argument (named in the message), a random layer
      that cannot be reproduced (named, with how to register it), or an
      `output_path` written with other settings.

  Warns:
    RuntimeWarning: every target is exactly 0 (the message names the likely
      cause).
  """
  spec = spec_model(model)
  num_samples, seed, batch_size, outputs = _check_common(
      spec, num_samples, seed, batch_size, statistic)
  source = _Source(spec, x)
  keys = _check_keys(keys, source.num_examples)
  ranges = [(0, num_samples)]
  if output_path is None:
    parts = []
    stop = 0
    for _, _, stop, _, _, (det, sums) in _run(  # noqa: B007 (read after)
        model, source, num_samples, seed, batch_size, keys, samples_per_pass,
        progress, ranges, "MC dropout", names=outputs.names):
      parts.append(outputs.finalize(det, sums[0], num_samples))
    _check_keys_used(keys, stop)
    return _warn_if_all_zero(model, outputs.concat(parts))

  output_path = os.fspath(output_path)
  n = source.num_examples
  statistic, out_shape = outputs.settings()
  settings = {
      "format_version": target_store.FORMAT_VERSION,
      "num_samples": num_samples,
      "seed": seed,
      "statistic": statistic,
      "num_examples": n,
      "keys_hash": hashlib.sha256(
          (np.arange(n, dtype=np.int64) if keys is None else keys).tobytes()
      ).hexdigest(),
      "model_fingerprint": model_fingerprint(model),
      "data_fingerprint": source.fingerprint(),
      "output_shape": out_shape,
      "chunk_rows": batch_size * max(1, -(-CHUNK_EXAMPLES // batch_size)),
  }
  chunk_rows, settings_digest = target_store.prepare_output(output_path,
                                                            settings)
  found = {}

  def reuse(index, start, stop, xc, kc):
    stored = target_store.read_chunk(output_path, index, settings_digest,
                                     start, stop)
    if stored is None:
      return None
    values, input_digest = stored
    if input_digest != target_store.input_digest(inputs.hashable(xc), kc):
      raise validation.invalid(
          "x", f"the input data of the run that wrote {output_path!r} "
          f"(examples {start}:{stop} differ)", "other input data")
    found[index] = values
    return ()

  parts = []
  for index, start, stop, xc, kc, result in _run(
      model, source, num_samples, seed, batch_size, keys, samples_per_pass,
      progress, ranges, "MC dropout", on_chunk=reuse, chunk_rows=chunk_rows,
      names=outputs.names):
    if index in found:
      parts.append(found.pop(index))
      continue
    det, sums = result
    values = outputs.finalize(det, sums[0], num_samples)
    target_store.write_chunk(
        output_path, index, settings_digest, start, stop,
        target_store.input_digest(inputs.hashable(xc), kc), values)
    parts.append(values)
  return _warn_if_all_zero(model, outputs.concat(parts))


def _check_keys_used(keys, num_examples):
  if keys is not None and keys.shape[0] != num_examples:
    raise validation.invalid(
        "keys", f"one key per example ({num_examples})",
        f"{keys.shape[0]} keys")


def _warn_if_all_zero(model, values):
  """Warns, naming the likely cause, when every target is exactly 0.

  Returns:
    `values`, unchanged.
  """
  flat = (np.concatenate([v.ravel() for v in values.values()])
          if isinstance(values, dict) else values)
  if flat.size == 0 or np.any(flat != 0):
    return values
  found = sources.find_sources(model)
  listed = ", ".join(f"{f.path!r} ({f.kind}, rate {f.rate})" for f in found)
  if all(f.rate is not None and f.rate <= 0 for f in found):
    cause = f"every dropout source has rate 0: {listed}"
  else:
    cause = (f"the sampled dropout sources ({listed}) never change the "
             "output: they sit where they cannot change it (e.g. on a path "
             "that does not reach the output, or before a layer that ignores "
             "its input), or the output saturates (e.g. a sigmoid or "
             "softmax at 0 or 1)")
  warnings.warn(
      f"Every MC dropout target is exactly 0: {cause}. A variation head "
      "fitted to them predicts 0, and its fidelity is undefined.",
      RuntimeWarning, stacklevel=3)
  return values


def split_half_targets(model, x, num_samples=100, seed=0, batch_size=256,
                       statistic="auto", keys=None):
  """DPV targets from each half of the samples, and from all of them.

  The T samples are split into two independent halves, samples [0, T//2)
  and [T//2, T); each gives its own DPV estimate. All three come from one
  run over `x`: the halves share the deterministic pass and the passes of
  the full estimate, which is identical to `mc_dropout_targets` with the
  same arguments. `metrics.mc_convergence` turns them into split-half
  reliability.

  Args:
    model, x, num_samples, seed, batch_size, statistic, keys: as in
      `mc_dropout_targets` (`num_samples` >= 4 so that halves have 2
      samples).

  Returns:
    (half_a, half_b, full): three float32 arrays, each shaped as
    `mc_dropout_targets` returns it.

  Raises:
    ValueError: an invalid argument, named in the message.
  """
  spec = spec_model(model)
  num_samples, seed, batch_size, outputs = _check_common(
      spec, num_samples, seed, batch_size, statistic)
  num_samples = validation.check_int(num_samples, "num_samples", 4)
  source = _Source(spec, x)
  keys = _check_keys(keys, source.num_examples)
  half = num_samples // 2
  ranges = [(0, half), (half, num_samples)]
  a_parts, b_parts, full_parts = [], [], []
  stop = 0
  for _, _, stop, _, _, (det, (sa, sb)) in _run(  # noqa: B007 (read after)
      model, source, num_samples, seed, batch_size, keys, None, False, ranges,
      "MC convergence", names=outputs.names):
    a_parts.append(outputs.finalize(det, sa, half))
    b_parts.append(outputs.finalize(det, sb, num_samples - half))
    full = (sa[0] + sb[0], sa[1] + sb[1])
    full_parts.append(outputs.finalize(det, full, num_samples))
  _check_keys_used(keys, stop)
  return (outputs.concat(a_parts), outputs.concat(b_parts),
          outputs.concat(full_parts))
