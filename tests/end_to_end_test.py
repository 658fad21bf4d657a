"""End to end through the public API: add head, targets, fit, export, serve.

Uses only `dropvar_tf` top-level names (what a user imports), on tiny models.
"""

import os
import sys
import tempfile

import numpy as np

import dropvar_tf as dv
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_NUM_SAMPLES = 12


def _to_tensors(x):
  if isinstance(x, dict):
    return {k: tf.constant(v) for k, v in x.items()}
  return {"features": tf.constant(x)}


class EndToEndTest(tf.test.TestCase):

  def _chain(self, kind):
    model = tm.build(kind)
    x_fit = tm.sample_inputs(kind, 200, seed=0)
    x_new = tm.sample_inputs(kind, 7, seed=1)
    base_before = model.predict(x_new, verbose=0)

    dual = dv.add_variation_head(model, layers="all", hidden_units=(16,))
    statistic = dv.variation_head_metadata(dual)["statistic"]
    targets = dv.mc_dropout_targets(model, x_fit, num_samples=_NUM_SAMPLES,
                                    seed=0, statistic=statistic,
                                    progress=False)
    again = dv.mc_dropout_targets(model, x_fit, num_samples=_NUM_SAMPLES,
                                  seed=0, statistic=statistic, progress=False)
    self.assertAllEqual(targets, again)
    dv.fit_variation_head(dual, x_fit, targets, epochs=3,
                          num_samples=_NUM_SAMPLES)
    out = dual.predict(x_new, verbose=0)
    self.assertEqual(set(out), set(dv.OUTPUT_KEYS))
    self.assertAllEqual(out[dv.PREDICTION_KEY], base_before)
    self.assertAllEqual(model.predict(x_new, verbose=0), base_before)
    self.assertTrue(np.all(out[dv.VARIATION_KEY] >= 0))

    export_base = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()),
                               kind)
    path = dv.export_saved_model(dual, export_base)
    self.assertEqual(path, os.path.join(export_base, "1"))
    meta = dv.read_export_metadata(export_base)
    self.assertEqual(meta["variation_head"]["num_samples"], _NUM_SAMPLES)
    self.assertEqual(meta["variation_head"]["statistic"], statistic)

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures[dv.SERVING_SIGNATURE]
    # Another batch size than any traced so far: the signature is variable.
    served = serve(**_to_tensors(x_new))
    self.assertEqual(set(served), set(dv.OUTPUT_KEYS))
    for key in dv.OUTPUT_KEYS:
      self.assertAllClose(served[key], out[key], rtol=1e-5, atol=1e-6,
                          msg=key)
    one = serve(**_to_tensors(tm.take(x_new, slice(0, 1))))
    self.assertAllClose(one[dv.VARIATION_KEY], out[dv.VARIATION_KEY][:1],
                        rtol=1e-5, atol=1e-6)

    plain = dv.strip_variation_head(dual)
    self.assertAllEqual(plain.predict(x_new, verbose=0), base_before)
    return dual

  def test_sequential_softmax(self):
    self._chain("softmax")

  def test_named_int64_inputs(self):
    self._chain("recommender")

  def test_keras_file_then_export(self):
    model = tm.binary_bn()
    x = tm.sample_inputs("binary_bn", 100)
    dual = dv.add_variation_head(model, hidden_units=(8,))
    dv.fit_variation_head(dual, x, dv.mc_dropout_targets(
        model, x, num_samples=6, seed=0, progress=False), epochs=2)
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    dual.save(os.path.join(folder, "dual.keras"))
    reloaded = keras.saving.load_model(os.path.join(folder, "dual.keras"))
    path = dv.export_saved_model(reloaded, os.path.join(folder, "export"))
    served = tf.saved_model.load(path).signatures[dv.SERVING_SIGNATURE](
        features=tf.constant(x[:3]))
    expected = dual.predict(x[:3], verbose=0)
    for key in dv.OUTPUT_KEYS:
      self.assertAllClose(served[key], expected[key], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  tf.test.main()
