"""Tests for dropvar_tf.augment (perturb_inputs)."""

import numpy as np

from dropvar_tf import augment
from dropvar_tf._keras import tf

_PREFIX = "Invalid value received for argument "
_ERR_NUM = _PREFIX + "`num`. Expected an integer >= 1. Received: num=0"
_ERR_LENGTHS = (_PREFIX + "`x`. Expected non-empty arrays of one common "
                "length. Received: x={'a': (3,), 'b': (4,)}")
_ERR_EMPTY_PREFIX = (_PREFIX + "`x`. Expected non-empty arrays of one common "
                     "length.")
_ERR_X_NONE = (_PREFIX + "`x`. Expected an array or a dict of arrays with a "
               "leading example axis. Received: x=None")


def _table(n=200, seed=0):
  """Dict inputs: two ids, float features on very different scales."""
  rng = np.random.default_rng(seed)
  return {
      "user_id": rng.choice([3, 7, 11, 50], n).astype("int64"),
      "movie_id": rng.integers(0, 1000, (n, 2)).astype("int32"),
      "dense": np.stack([rng.uniform(0.0, 1.0, n),
                         rng.uniform(100.0, 200.0, n)], 1).astype("float32"),
      "weight": rng.normal(size=n).astype("float64"),
  }


def _rows(x):
  return {tuple(np.atleast_1d(r)) for r in x}


class PerturbInputsTest(tf.test.TestCase):

  def test_shapes_and_dtypes_of_a_dict(self):
    x = _table()
    out = augment.perturb_inputs(x, 37, seed=0)
    self.assertEqual(set(out), set(x))
    for key, values in x.items():
      self.assertEqual(out[key].shape, (37,) + values.shape[1:], msg=key)
      self.assertEqual(out[key].dtype, values.dtype, msg=key)

  def test_array_in_array_out(self):
    x = np.random.default_rng(0).uniform(size=(50, 8, 8, 1)).astype(
        "float32")
    out = augment.perturb_inputs(x, 20, seed=0)
    self.assertIsInstance(out, np.ndarray)
    self.assertEqual(out.shape, (20, 8, 8, 1))
    self.assertEqual(out.dtype, np.float32)
    self.assertGreaterEqual(out.min(), x.min())
    self.assertLessEqual(out.max(), x.max())

  def test_seeded_and_seed_dependent(self):
    x = _table()
    a = augment.perturb_inputs(x, 64, seed=4)
    b = augment.perturb_inputs(x, 64, seed=4)
    c = augment.perturb_inputs(x, 64, seed=5)
    for key in x:
      self.assertAllEqual(a[key], b[key], msg=key)
      self.assertNotAllEqual(a[key], c[key], msg=key)

  def test_input_not_modified(self):
    x = _table()
    copy = {k: v.copy() for k, v in x.items()}
    augment.perturb_inputs(x, 300, noise=1.0, swap=1.0, seed=0)
    for key in x:
      self.assertAllEqual(x[key], copy[key], msg=key)

  def test_integer_features_keep_observed_values(self):
    x = _table()
    out = augment.perturb_inputs(x, 500, swap=1.0, seed=0)
    self.assertContainsSubset(set(out["user_id"].tolist()), {3, 7, 11, 50})
    self.assertContainsSubset(set(out["movie_id"].ravel().tolist()),
                              set(x["movie_id"].ravel().tolist()))
    # With swap=1 some values are replaced, not all rows copied.
    self.assertFalse(_rows(out["movie_id"]) <= _rows(x["movie_id"]))

  def test_no_noise_no_swap_copies_rows(self):
    x = _table()
    out = augment.perturb_inputs(x, 50, noise=0.0, swap=0.0, seed=0)
    for key in x:
      self.assertLessEqual(_rows(out[key]), _rows(x[key]), msg=key)

  def test_noise_moves_float_features(self):
    x = _table()
    out = augment.perturb_inputs(x, 200, noise=0.5, seed=0)
    self.assertFalse(_rows(out["weight"]) <= _rows(x["weight"]))

  def test_floats_clipped_to_overall_range(self):
    x = _table()
    out = augment.perturb_inputs(x, 2000, noise=2.0, seed=0)
    self.assertGreaterEqual(out["weight"].min(), x["weight"].min())
    self.assertLessEqual(out["weight"].max(), x["weight"].max())
    self.assertGreaterEqual(out["dense"].min(), x["dense"].min())
    self.assertLessEqual(out["dense"].max(), x["dense"].max())

  def test_floats_clipped_to_each_features_range(self):
    x = _table()
    out = augment.perturb_inputs(x, 2000, noise=0.5, seed=0)
    self.assertAllGreaterEqual(out["dense"] - x["dense"].min(axis=0), 0.0)
    self.assertAllLessEqual(out["dense"] - x["dense"].max(axis=0), 0.0)

  def test_strings_are_swapped_as_categories(self):
    rng = np.random.default_rng(0)
    names = rng.choice(["a", "b", "c", "d"], (300, 2))
    for form in (names, names.astype("S"), names.astype(object)):
      with self.subTest(dtype=form.dtype):
        out = augment.perturb_inputs({"name": form}, 500, swap=1.0,
                                     seed=0)["name"]
        kept = augment.perturb_inputs({"name": form}, 500, swap=0.0,
                                      seed=0)["name"]
        self.assertEqual(out.dtype, form.dtype)
        self.assertEqual(out.shape, (500, 2))
        self.assertContainsSubset(set(out.ravel().tolist()),
                                  set(form.ravel().tolist()))
        # The same rows are drawn; with swaps some of their values differ
        # (a quarter of those swapped take the same value back).
        changed = np.mean(out != kept)
        self.assertBetween(changed, 0.2, 0.5)

  def test_other_dtypes_pass_through(self):
    x = {"flag": np.array([True, False, True]), "v": np.arange(3.0)}
    out = augment.perturb_inputs(x, 10, seed=0)
    self.assertEqual(out["flag"].dtype, bool)
    self.assertEqual(out["flag"].shape, (10,))

  def test_a_list_gives_a_list(self):
    x = _table()
    out = augment.perturb_inputs([x["user_id"], x["dense"]], 30, seed=1)
    want = augment.perturb_inputs({0: x["user_id"], 1: x["dense"]}, 30,
                                  seed=1)
    self.assertIsInstance(out, list)
    self.assertAllEqual(out[0], want[0])
    self.assertAllEqual(out[1], want[1])

  def test_ragged_rows_keep_their_lengths(self):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 6, 50)
    ids = tf.RaggedTensor.from_row_lengths(
        rng.integers(0, 20, int(lengths.sum())), lengths)
    values = tf.RaggedTensor.from_row_lengths(
        rng.uniform(2.0, 3.0, int(lengths.sum())), lengths)
    out = augment.perturb_inputs({"ids": ids, "values": values}, 80,
                                 noise=1.0, swap=1.0, seed=2)
    self.assertAllEqual(out["ids"].row_lengths(), out["values"].row_lengths())
    self.assertContainsSubset(set(out["ids"].flat_values.numpy().tolist()),
                              set(ids.flat_values.numpy().tolist()))
    floats = out["values"].flat_values.numpy()
    self.assertAllInRange(floats, 2.0, 3.0)
    self.assertNotAllClose(np.sort(floats)[:10], np.sort(
        values.flat_values.numpy())[:10])
    again = augment.perturb_inputs({"ids": ids, "values": values}, 80,
                                   noise=1.0, swap=1.0, seed=2)
    self.assertAllEqual(again["ids"].to_list(), out["ids"].to_list())

  def test_errors(self):
    cases = [
        (_ERR_NUM, np.ones((3, 2)), 0),
        (_ERR_LENGTHS, {"a": np.zeros(3), "b": np.zeros(4)}, 3),
    ]
    for message, x, num in cases:
      with self.subTest(message=message):
        with self.assertRaises(ValueError) as cm:
          augment.perturb_inputs(x, num)
        self.assertEqual(str(cm.exception), message)
    with self.assertRaisesRegex(ValueError, _ERR_EMPTY_PREFIX):
      augment.perturb_inputs(np.zeros((0, 3)), 3)

  def test_bad_values_and_settings(self):
    bad = np.zeros((4, 3), "float32")
    bad[1, 2], bad[3, 0] = np.nan, np.inf
    ragged = tf.RaggedTensor.from_row_lengths(
        np.array([0.5, np.nan, 1.0], "float32"), [1, 2])
    cases = [
        ("`x`. Expected finite values (no NaN or Inf). Received: "
         "x='2 NaN or Inf values'", bad, {}),
        ("`x`. Expected finite values (no NaN or Inf). Received: "
         "x=\"1 NaN or Inf values in x['t']\"", {"t": ragged}, {}),
        ("`noise`. Expected a number >= 0. Received: noise=-0.1",
         np.ones((3, 2)), dict(noise=-0.1)),
        ("`swap`. Expected a probability in [0, 1]. Received: swap=1.5",
         np.ones((3, 2)), dict(swap=1.5)),
        ("`seed`. Expected an integer >= 0. Received: seed=-3",
         np.ones((3, 2)), dict(seed=-3)),
    ]
    for message, x, kwargs in cases:
      with self.subTest(message=message):
        with self.assertRaises(ValueError) as cm:
          augment.perturb_inputs(x, 3, **kwargs)
        self.assertEqual(str(cm.exception), _PREFIX + message)

  def test_none_raises_value_error(self):
    with self.assertRaises(ValueError) as cm:
      augment.perturb_inputs(None, 3)
    self.assertEqual(str(cm.exception), _ERR_X_NONE)


if __name__ == "__main__":
  tf.test.main()
