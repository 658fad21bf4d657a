"""Tests for dropvar_tf.moment_rules (moments of f(z) for a Gaussian z)."""

import numpy as np
from scipy import stats

from dropvar_tf import moment_rules
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf


class MomentRulesTest(tf.test.TestCase):
  """Single-layer moment rules against numerical integration."""

  def _grid(self):
    mean = np.linspace(-4.0, 4.0, 9, dtype="float32")
    var = np.array([0.0, 0.01, 0.5, 2.0, 9.0], dtype="float32")
    return np.meshgrid(mean, var)

  def _integrate(self, fn, mean, var):
    z = np.linspace(-12.0, 12.0, 20001)
    weights = np.exp(-0.5 * z**2)
    weights /= weights.sum()
    values = fn(mean[..., None] + np.sqrt(var)[..., None] * z)
    first = (weights * values).sum(-1)
    return first, (weights * (values - first[..., None])**2).sum(-1)

  def test_relu_moments_are_exact(self):
    mean, var = self._grid()
    got_mean, got_var = moment_rules.relu_moments(tf.constant(mean),
                                                  tf.constant(var))
    want_mean, want_var = self._integrate(lambda z: np.maximum(z, 0), mean, var)
    self.assertAllClose(got_mean, want_mean, atol=1e-5)
    self.assertAllClose(got_var, want_var, atol=1e-4, rtol=1e-4)

  def test_relu_variance_is_stable_far_from_zero(self):
    # E[y^2] - E[y]^2 would lose all digits here in float32.
    mean = tf.constant([1000.0, -1000.0, 30.0])
    var = tf.constant([1e-4, 1e-4, 0.0])
    got_mean, got_var = moment_rules.relu_moments(mean, var)
    self.assertAllClose(got_mean, [1000.0, 0.0, 30.0])
    self.assertAllClose(got_var, [1e-4, 0.0, 0.0], atol=1e-9, rtol=1e-3)

  def test_sigmoid_and_tanh_moments_are_close(self):
    mean, var = self._grid()
    def sig(z):
      return 1.0 / (1.0 + np.exp(-z))

    for rule, fn in ((moment_rules.sigmoid_moments, sig),
                     (moment_rules.tanh_moments, np.tanh)):
      got_mean, got_var = rule(tf.constant(mean), tf.constant(var))
      want_mean, want_var = self._integrate(fn, mean, var)
      scale = 1.0 if fn is sig else 2.0  # tanh spans [-1, 1].
      self.assertAllClose(got_mean, want_mean, atol=0.02 * scale)
      # 20 Gauss-Hermite nodes: the std is within 1% up to a pre-activation
      # std of 3 for the sigmoid; tanh doubles the scale (3% measured).
      self.assertAllClose(np.sqrt(got_var), np.sqrt(want_var),
                          atol=1e-4, rtol=0.01 * scale**2)
      self.assertAllClose(np.asarray(got_var)[0], np.zeros(9), atol=1e-12)

  def test_quadrature_fallback_matches_integration(self):
    mean, var = self._grid()
    gelu = keras.activations.gelu
    got_mean, got_var = moment_rules.quadrature_moments(
        gelu, tf.constant(mean), tf.constant(var))
    want_mean, want_var = self._integrate(
        lambda z: np.asarray(gelu(tf.constant(z, tf.float32))), mean, var)
    # 20 nodes: within 0.5% of the mean and 2% of the variance here.
    self.assertAllClose(got_mean, want_mean, atol=1e-3, rtol=5e-3)
    self.assertAllClose(got_var, want_var, atol=2e-3, rtol=0.02)

  def test_softmax_moments_match_sampling(self):
    rng = np.random.RandomState(0)
    mean = rng.normal(0.0, 2.0, size=(20, 4)).astype("float32")
    var = rng.uniform(0.0, 1.0, size=(20, 4)).astype("float32")
    z = mean + np.sqrt(var) * rng.normal(size=(20000, 20, 4))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    got_mean, got_var = moment_rules.softmax_moments(tf.constant(mean),
                                                     tf.constant(var))
    self.assertAllClose(np.sum(got_mean, -1), np.ones(20), atol=1e-5)
    self.assertAllClose(got_mean, p.mean(0), atol=0.05)
    self.assertGreater(
        stats.spearmanr(np.ravel(got_var), np.ravel(p.var(0)))[0], 0.95)

  def test_clark_max_matches_sampling(self):
    rng = np.random.RandomState(1)
    m1, m2 = rng.normal(size=(2, 50)).astype("float32")
    v1, v2 = rng.uniform(0.0, 2.0, size=(2, 50)).astype("float32")
    s = np.maximum(m1 + np.sqrt(v1) * rng.normal(size=(100000, 50)),
                   m2 + np.sqrt(v2) * rng.normal(size=(100000, 50)))
    got_mean, got_var = moment_rules.clark_max_moments(m1, v1, m2, v2)
    self.assertAllClose(got_mean, s.mean(0), atol=0.02)
    self.assertAllClose(got_var, s.var(0), atol=0.03, rtol=0.03)


if __name__ == "__main__":
  tf.test.main()
