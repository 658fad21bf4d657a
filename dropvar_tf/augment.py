"""Plausible unlabeled inputs for fitting a variation head.

MC-dropout targets need no labels, so any plausible input can teach the head.
A model is overconfident on the inputs it was trained on (their DPV is a
fraction of that of unseen inputs), so a head fitted there underestimates on
new data. Perturbed copies of the inputs, at a spread of strengths, look
unseen to the model while staying on the data distribution.
"""

import numpy as np

from dropvar_tf import inputs
from dropvar_tf import validation
from dropvar_tf._keras import tf


def _perturb_float(values, strength, noise, rng):
  scale = np.std(values, axis=0, keepdims=True)
  scale = np.where(scale > 0, scale, 1.0)
  s = strength.reshape((-1,) + (1,) * (values.ndim - 1))
  out = values + rng.normal(size=values.shape) * noise * scale * s
  # Each feature stays within its own observed range (pixels in [0, 1]...).
  lo, hi = values.min(axis=0), values.max(axis=0)
  return np.clip(out, lo, hi).astype(values.dtype)


def _perturb_int(values, strength, swap, rng, pool):
  s = strength.reshape((-1,) + (1,) * (values.ndim - 1))
  replace = rng.uniform(size=values.shape) < swap * s
  donors = pool[rng.integers(0, len(pool), size=values.shape[0])]
  return np.where(replace, donors, values).astype(values.dtype)


def _perturb_ragged(values, rows, strength, noise, swap, rng):
  """Rows `rows` of a RaggedTensor, perturbed token by token.

  Row lengths stay. Float tokens get noise scaled by the std of all tokens
  (clipped to their range); other tokens are replaced, each with
  probability `swap * s`, by a random token of the whole input.
  """
  base = tf.gather(values, rows)
  tokens = base.flat_values.numpy()
  pool = values.flat_values.numpy()
  # The strength of the row each token belongs to.
  s = strength[base.nested_value_rowids()[0].numpy()]
  for splits in base.nested_value_rowids()[1:]:
    s = s[splits.numpy()]
  if np.issubdtype(tokens.dtype, np.floating):
    scale = np.std(pool, axis=0, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    s = s.reshape((-1,) + (1,) * (tokens.ndim - 1))
    out = tokens + rng.normal(size=tokens.shape) * noise * scale * s
    out = np.clip(out, pool.min(axis=0), pool.max(axis=0))
  else:
    replace = rng.uniform(size=len(tokens)) < swap * s
    donors = pool[rng.integers(0, len(pool), size=len(tokens))]
    replace = replace.reshape((-1,) + (1,) * (tokens.ndim - 1))
    out = np.where(replace, donors, tokens)
  return base.with_flat_values(tf.constant(out.astype(tokens.dtype)))


def perturb_inputs(x, num, noise=0.3, swap=0.3, seed=0, model=None):
  """Returns `num` perturbed copies of random rows of `x`.

  Each new row starts from a random row of `x` and gets a random strength
  s ~ U(0, 1): float features get Gaussian noise with std `noise * s` times
  the feature's std (clipped to the observed range); integer and string
  (categorical) features are replaced, each with probability `swap * s`, by
  the value of another random row (so ids stay valid and keep their
  frequencies). Ragged features (`tf.RaggedTensor`) keep their row lengths
  and are perturbed token by token the same way.

  Args:
    x: array (N, ...), a dict or list of arrays with one common N (numpy
      strings of any dtype, and `tf.RaggedTensor`s, included), or, with
      `model`, anything `inputs.normalize` reads for it (a
      `tf.data.Dataset` of examples or batches, of `x` or of `(x, y)`: it
      is read into memory, `y` dropped).
    num: number of rows to make.
    noise: relative noise level for float features.
    swap: replacement probability for integer and string features.
    seed: seed of the sampling.
    model: optional model `x` feeds; needed for a Dataset (to tell batches
      from examples and inputs from labels).

  Returns:
    An array, dict, list or RaggedTensor like `x` with `num` rows (for a
    Dataset: in the model's input structure, strings as object arrays of
    bytes).

  Raises:
    ValueError: `x` is empty, not array-like, has NaN or Inf values, is a
      Dataset without `model`, or does not match `model`; or `num`,
      `noise`, `swap` or `seed` is out of range.
  """
  num = validation.check_int(num, "num", 1)
  validation.check_number(noise, "noise", "a number >= 0", lambda v: v >= 0)
  validation.check_number(swap, "swap", "a probability in [0, 1]",
                          lambda v: 0 <= v <= 1)
  seed = validation.check_int(seed, "seed", 0)
  if model is not None:
    x = inputs.normalize(model, x).materialize()
  elif isinstance(x, tf.data.Dataset):
    raise validation.invalid(
        "model", "the model a Dataset `x` feeds (to tell batches from "
        "examples and inputs from labels)", model)
  rng = np.random.default_rng(seed)
  if isinstance(x, dict):
    arrays = dict(x)
  elif isinstance(x, (list, tuple)):
    arrays = dict(enumerate(x))
  else:
    arrays = {None: x}
  arrays = {k: v if isinstance(v, tf.RaggedTensor) else np.asarray(v)
            for k, v in arrays.items()}
  if not arrays or any(v.shape.rank == 0 if isinstance(v, tf.RaggedTensor)
                       else v.ndim == 0 for v in arrays.values()):
    raise validation.invalid("x", "an array or a dict of arrays with a "
                             "leading example axis", x)
  lengths = {int(v.shape[0]) for v in arrays.values()}
  if len(lengths) != 1 or 0 in lengths:
    raise validation.invalid("x", "non-empty arrays of one common length",
                             {k: v.shape for k, v in arrays.items()})
  n = lengths.pop()
  for key, v in arrays.items():
    values = v.flat_values.numpy() if isinstance(v, tf.RaggedTensor) else v
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
      raise validation.invalid(
          "x", "finite values (no NaN or Inf)",
          f"{int(np.sum(~np.isfinite(values)))} NaN or Inf values"
          + ("" if key is None else f" in x[{key!r}]"))
  rows = rng.integers(0, n, size=num)
  strength = rng.uniform(size=num)
  out = {}
  for key, values in arrays.items():
    if isinstance(values, tf.RaggedTensor):
      out[key] = _perturb_ragged(values, rows, strength, noise, swap, rng)
      continue
    base = values[rows]
    if np.issubdtype(values.dtype, np.floating):
      out[key] = _perturb_float(base, strength, noise, rng)
    elif np.issubdtype(values.dtype, np.integer) or values.dtype.kind in (
        "SUO"):
      out[key] = _perturb_int(base, strength, swap, rng, values)
    else:
      out[key] = base
  if isinstance(x, (list, tuple)):
    return type(x)(out[i] for i in range(len(x)))
  return out.get(None, out)
