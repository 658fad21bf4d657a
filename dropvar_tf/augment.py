"""Plausible unlabeled inputs for fitting a variation head.

MC-dropout targets need no labels, so any plausible input can teach the head.
A model is overconfident on the inputs it was trained on (their DPV is a
fraction of that of unseen inputs), so a head fitted there underestimates on
new data. Perturbed copies of the inputs, at a spread of strengths, look
unseen to the model while staying on the data distribution.
"""

import numpy as np

from dropvar_tf import validation


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


def perturb_inputs(x, num, noise=0.3, swap=0.3, seed=0):
  """Returns `num` perturbed copies of random rows of `x`.

  Each new row starts from a random row of `x` and gets a random strength
  s ~ U(0, 1): float features get Gaussian noise with std `noise * s` times
  the feature's std (clipped to the observed range); integer (categorical)
  features are replaced, each with probability `swap * s`, by the value of
  another random row (so ids stay valid and keep their frequencies).

  Args:
    x: array (N, ...) or dict of arrays with one common N.
    num: number of rows to make.
    noise: relative noise level for float features.
    swap: replacement probability for integer features.
    seed: seed of the sampling.

  Returns:
    An array or dict like `x` with `num` rows.

  Raises:
    ValueError: `x` is empty or not array-like, or `num` < 1.
  """
  num = validation.check_int(num, "num", 1)
  rng = np.random.default_rng(seed)
  arrays = x if isinstance(x, dict) else {None: x}
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if not arrays or any(v.ndim == 0 for v in arrays.values()):
    raise validation.invalid("x", "an array or a dict of arrays with a "
                             "leading example axis", x)
  lengths = {len(v) for v in arrays.values()}
  if len(lengths) != 1 or 0 in lengths:
    raise validation.invalid("x", "non-empty arrays of one common length",
                             {k: v.shape for k, v in arrays.items()})
  n = lengths.pop()
  rows = rng.integers(0, n, size=num)
  strength = rng.uniform(size=num)
  out = {}
  for key, values in arrays.items():
    base = values[rows]
    if np.issubdtype(values.dtype, np.floating):
      out[key] = _perturb_float(base, strength, noise, rng)
    elif np.issubdtype(values.dtype, np.integer):
      out[key] = _perturb_int(base, strength, swap, rng, values)
    else:
      out[key] = base
  return out.get(None, out)
