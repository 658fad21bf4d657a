"""Moment rules: mean and variance of f(z) for a Gaussian z, element-wise.

The closed forms and quadratures that moment propagation
(`dropvar_tf.moments`, whose docstring states the approximations) applies at
every activation and max pooling. Each rule takes float32 tensors `mean` and
`var` of one shape and returns the output mean and variance, same shape.
"""

import math

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

# Variances below this are treated as zero where a division by the standard
# deviation is needed; rectified/max moments are then exact to ~1e-10.
_TINY_VAR = 1e-20
# Beyond |alpha| = 40 the Gaussian cdf is exactly 0 or 1 in float32; clipping
# keeps alpha**2 finite when the standard deviation is ~0.
_MAX_ALPHA = 40.0
_PROBIT_SCALE_SQ = math.pi / 8.0
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite.hermgauss(20)
_GH_WEIGHTS = _GH_WEIGHTS / math.sqrt(math.pi)


def _normal_cdf(x):
  return 0.5 * tf.math.erfc(-x / math.sqrt(2.0))


def _normal_pdf(x):
  return tf.exp(-0.5 * tf.square(x)) / math.sqrt(2.0 * math.pi)


def _std_and_alpha(mean, var):
  std = tf.sqrt(tf.maximum(var, _TINY_VAR))
  alpha = tf.clip_by_value(mean / std, -_MAX_ALPHA, _MAX_ALPHA)
  return std, alpha


def _rectified_bracket(alpha):
  """Var[max(Z + alpha, 0)] for Z ~ N(0, 1), written without cancellation.

  Expanding E[y^2] - E[y]^2 with Phi(a) + Phi(-a) = 1 removes the alpha^2
  terms that cancel catastrophically in float32 for large |alpha|.
  """
  cdf = _normal_cdf(alpha)
  sf = _normal_cdf(-alpha)
  pdf = _normal_pdf(alpha)
  return (cdf + tf.square(alpha) * cdf * sf + alpha * pdf * (sf - cdf) -
          tf.square(pdf))


def relu_moments(mean, var):
  """Exact mean and variance of relu(z), z ~ N(mean, var), element-wise."""
  std, alpha = _std_and_alpha(mean, var)
  out_mean = mean * _normal_cdf(alpha) + std * _normal_pdf(alpha)
  out_var = tf.square(std) * tf.maximum(_rectified_bracket(alpha), 0.0)
  return out_mean, out_var


def sigmoid_moments(mean, var):
  """Approximate mean and variance of sigmoid(z), z ~ N(mean, var).

  Mean: the probit approximation sigmoid(mean / sqrt(1 + pi var / 8)).
  Variance: Gauss-Hermite quadrature (`quadrature_moments`). The variance of
  the probit surrogate Phi(sqrt(pi / 8) z) is not used: its tails are too
  thin, so it underestimates the std of confident units (large |mean|, small
  variance) by far (docs/measurements.md).
  """
  out_mean = tf.sigmoid(mean / tf.sqrt(1.0 + _PROBIT_SCALE_SQ * var))
  _, out_var = quadrature_moments(tf.sigmoid, mean, var)
  return out_mean, out_var


def tanh_moments(mean, var):
  """Moments of tanh(z) = 2 sigmoid(2 z) - 1 from the sigmoid rule."""
  s_mean, s_var = sigmoid_moments(2.0 * mean, 4.0 * var)
  return 2.0 * s_mean - 1.0, 4.0 * s_var


def softmax_moments(mean, var):
  """Approximate moments of softmax(z) on the last axis (one-vs-rest rule).

  p_k = sigmoid(z_k - logsumexp_{j != k} z_j). The margin has mean
  mean_k - logsumexp_{j != k}(mean_j) and variance
  var_k + sum_{j != k} w_kj^2 var_j, w_k = softmax over j != k of the mean
  logits (first-order expansion of the logsumexp); then `sigmoid_moments`.
  """
  k = mean.shape[-1]
  if k == 1:
    return tf.ones_like(mean), tf.zeros_like(var)
  others = tf.constant(np.where(np.eye(k, dtype=bool), -np.inf, 0.0),
                       tf.float32)
  logits = mean[..., None, :] + others  # (..., k, k): row k drops class k.
  lse = tf.reduce_logsumexp(logits, axis=-1)
  weights = tf.nn.softmax(logits, axis=-1)
  margin_mean = mean - lse
  margin_var = var + tf.reduce_sum(
      tf.square(weights) * var[..., None, :], axis=-1)
  p_mean, p_var = sigmoid_moments(margin_mean, margin_var)
  p_mean /= tf.reduce_sum(p_mean, axis=-1, keepdims=True)
  return p_mean, p_var


def quadrature_moments(fn, mean, var):
  """Mean and variance of fn(z), z ~ N(mean, var), by Gauss-Hermite.

  `fn` must be element-wise. The variance is the weighted spread around the
  mean (not E[f^2] - E[f]^2), so it does not cancel when var is small.
  """
  nodes = tf.constant(_GH_NODES, tf.float32)
  weights = tf.constant(_GH_WEIGHTS, tf.float32)
  std = tf.sqrt(tf.maximum(var, 0.0))
  z = mean[..., None] + math.sqrt(2.0) * std[..., None] * nodes
  shape = tf.shape(z)
  fz = tf.reshape(fn(tf.reshape(z, [-1])), shape)
  out_mean = tf.reduce_sum(weights * fz, axis=-1)
  out_var = tf.reduce_sum(weights * tf.square(fz - out_mean[..., None]),
                          axis=-1)
  return out_mean, out_var



def activation_name(activation):
  """The registered name of a Keras activation function, or None."""
  name = keras.activations.serialize(activation)
  return name if isinstance(name, str) else None



def activation_moments(activation, mean, var):
  """Dispatches an activation function to its moment rule."""
  name = activation_name(activation)
  if name == "linear":
    return mean, var
  if name == "relu":
    return relu_moments(mean, var)
  if name == "sigmoid":
    return sigmoid_moments(mean, var)
  if name == "tanh":
    return tanh_moments(mean, var)
  if name == "softmax":
    return softmax_moments(mean, var)
  return quadrature_moments(activation, mean, var)


def clark_max_moments(mean1, var1, mean2, var2):
  """Clark's (1961) mean and variance of max(X1, X2), X1, X2 independent."""
  theta2 = var1 + var2
  theta, alpha = _std_and_alpha(mean1 - mean2, theta2)
  cdf = _normal_cdf(alpha)
  sf = _normal_cdf(-alpha)
  pdf = _normal_pdf(alpha)
  out_mean = mean2 + (mean1 - mean2) * cdf + theta * pdf
  # Same expansion as `_rectified_bracket`, shifted by mean2; no cancellation.
  bracket = (tf.square(alpha) * cdf * sf + alpha * pdf * (sf - cdf) -
             tf.square(pdf))
  out_var = var1 * cdf + var2 * sf + tf.square(theta) * bracket
  return out_mean, tf.maximum(out_var, 0.0)
