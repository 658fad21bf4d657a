"""Tests for dropvar_tf.beam.model_handler: a SavedModel signature in Beam.

They need `apache_beam` (e.g. `.venv-beam/bin/python -m pytest -q
tests/beam_model_handler_test.py`) and are skipped, with the reason,
elsewhere.
"""

import os
import shutil
import tempfile
import unittest

import numpy as np

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf._keras import tf
import beam_testing

if beam_testing.HAVE_BEAM:
  import apache_beam as beam
  from apache_beam.ml.inference.base import KeyedModelHandler
  from apache_beam.ml.inference.base import RunInference
  from apache_beam.testing.util import assert_that
  from dropvar_tf.beam import model_handler

_ERR_SIGNATURE = ("Invalid value received for argument `signature`. Expected "
                  "one of the SavedModel's signatures")


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class ModelHandlerTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="beam_model_handler_test_")
    dual = heads.add_variation_head(beam_testing.build_model("dict"))
    cls.export = saved_model.export_saved_model(
        dual, os.path.join(cls.root, "dual"), version=1)
    cls.x = beam_testing.dict_inputs(12, seed=1)
    cls.examples = [{n: v[i] for n, v in cls.x.items()} for i in range(12)]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_load_signature(self):
    loaded, fn = model_handler.load_signature(self.export)
    self.assertIn(contract.SERVING_SIGNATURE, loaded.signatures)
    self.assertCountEqual(fn.structured_outputs, contract.OUTPUT_KEYS)
    with self.assertRaisesRegex(ValueError, _ERR_SIGNATURE):
      model_handler.load_signature(self.export, "nope")

  def test_run_inference_equals_the_signature_on_the_same_batch(self):
    handler = model_handler.SignatureHandler(self.export, batch_size=12)
    self.assertEqual(handler.batch_elements_kwargs(),
                     {"min_batch_size": 12, "max_batch_size": 12})
    model = handler.load_model()
    results = list(handler.run_inference(self.examples, model))
    _, fn = model_handler.load_signature(self.export)
    expected = fn(**{n: tf.constant(v) for n, v in self.x.items()})
    self.assertLen(results, 12)
    for name in contract.OUTPUT_KEYS:
      got = np.stack([r.inference[name] for r in results])
      # One call on the same batch: the same kernels, bitwise equal.
      self.assertAllEqual(got, expected[name].numpy(), msg=name)
    self.assertIs(results[3].example, self.examples[3])
    self.assertEqual(results[0].model_id, self.export)

  def test_small_batches_are_padded_to_batch_size(self):
    handler = model_handler.SignatureHandler(self.export, batch_size=16)
    results = list(handler.run_inference(self.examples[:5],
                                         handler.load_model()))
    self.assertLen(results, 5)
    _, fn = model_handler.load_signature(self.export)
    # The call the handler makes: 5 rows, then the 5th repeated to 16.
    rows = list(range(5)) + [4] * 11
    expected = fn(**{n: tf.constant(v[rows]) for n, v in self.x.items()})
    for name in contract.OUTPUT_KEYS:
      got = np.stack([r.inference[name] for r in results])
      self.assertAllEqual(got, expected[name].numpy()[:5], msg=name)

  def test_large_batches_are_cut_into_calls_of_batch_size(self):
    handler = model_handler.SignatureHandler(self.export, batch_size=5)
    results = list(handler.run_inference(self.examples,
                                         handler.load_model()))
    self.assertLen(results, 12)
    _, fn = model_handler.load_signature(self.export)
    # Calls of rows 0-4, 5-9, then 10, 11 and 11 repeated to 5 rows.
    expected = [fn(**{n: tf.constant(v[rows]) for n, v in self.x.items()})
                for rows in (range(5), range(5, 10), [10, 11, 11, 11, 11])]
    for name in contract.OUTPUT_KEYS:
      got = np.stack([r.inference[name] for r in results])
      want = np.concatenate([e[name].numpy() for e in expected])[:12]
      self.assertAllEqual(got, want, msg=name)
    self.assertIs(results[11].example, self.examples[11])

  def test_keyed_run_inference_in_a_pipeline(self):
    _, fn = model_handler.load_signature(self.export)
    expected = fn(**{n: tf.constant(v) for n, v in self.x.items()})
    keys = list(range(500, 512))
    handler = KeyedModelHandler(model_handler.SignatureHandler(
        self.export, batch_size=12))

    def check(got):
      got = dict(got)
      if sorted(got) != keys:
        raise AssertionError(f"keys {sorted(got)} != {keys}")
      for i, key in enumerate(keys):
        np.testing.assert_array_equal(
            got[key].inference[contract.VARIATION_KEY],
            expected[contract.VARIATION_KEY][i])

    with beam.Pipeline() as pipeline:
      results = (pipeline
                 | beam.Create(list(zip(keys, self.examples)))
                 | RunInference(handler))
      assert_that(results, check)

  def test_update_model_path(self):
    handler = model_handler.SignatureHandler(self.export)
    handler.update_model_path("/models/dual/2")
    self.assertEqual(handler.saved_model_dir, "/models/dual/2")
    handler.update_model_path(None)
    self.assertEqual(handler.saved_model_dir, "/models/dual/2")


if __name__ == "__main__":
  tf.test.main()
