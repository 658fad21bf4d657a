"""A variation head per output of multi-output models (dict, list, subclassed).

The whole flow per kind: MC targets (one array per output), fit (one head
per output), predict, strip, export, and the export served over gRPC by the
in-process server equal to in-process; the client and CLI on that layout.
"""

import json
import os

import numpy as np

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf import targets
from dropvar_tf import training
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import client_cli
from dropvar_tf.serving import server as server_lib
import testing_models as tm

_NAMES = {"dict": ["klass", "value"], "list": ["value", "klass"],
          "subclassed": ["output_0", "output_1"]}
# Which output is the 1-unit "value" one (the other has 3 softmax units).
_VALUE = {"dict": "value", "list": "value", "subclassed": "output_0"}


def _single_output(model, kind, name):
  """The same weights with only output `name`, as a Functional model."""
  view, _ = heads.functional_view(model)
  out = view.output
  if kind == "dict":
    out = out[name]
  else:
    out = out[_NAMES[kind].index(name)]
  return keras.Model(view.input, out)


class MultiOutputTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.x = tm.target_features(120, seed=2) * 2.0

  def _flow(self, kind):
    model = tm.multi_output(kind)
    names = _NAMES[kind]
    t = targets.mc_dropout_targets(model, self.x, num_samples=30, seed=0)
    self.assertEqual(sorted(t), sorted(names))
    for name in names:
      # Each output's targets are those of a model with that output alone.
      alone = targets.mc_dropout_targets(
          _single_output(model, kind, name), self.x, num_samples=30, seed=0)
      self.assertAllClose(t[name], alone, rtol=1e-6, atol=1e-7)
      self.assertEqual(t[name].shape, (120,))
      self.assertTrue(np.all(t[name] > 0))

    dual = heads.add_variation_head(model, seed=0)
    self.assertEqual(heads.dual_output_names(dual), names)
    self.assertEqual(sorted(dual.output), list(contract.output_keys(names)))
    value_meta = heads.variation_head_metadata(dual, _VALUE[kind])
    self.assertTrue(value_meta["include_delta"])  # Dropout -> Dense output
    other = [n for n in names if n != _VALUE[kind]][0]
    self.assertEqual(heads.variation_head_metadata(dual, other)["statistic"],
                     contract.STAT_PREDICTED_CLASS_STD)
    histories = training.fit_variation_head(dual, self.x, t, epochs=2,
                                            seed=0)
    self.assertEqual(sorted(histories), sorted(names))
    for name in names:
      report = heads.variation_head_metadata(dual, name)["fit_report"]
      self.assertIsNotNone(report)

    out = dual.predict(self.x, verbose=0)
    base_out = model(self.x)
    for i, name in enumerate(names):
      expected = base_out[name] if kind == "dict" else base_out[i]
      self.assertAllClose(out[contract.prediction_key(name)], expected,
                          atol=1e-6)
      variation = out[contract.variation_key(name)]
      self.assertEqual(variation.shape, (120,))
      self.assertTrue(np.all(variation >= 0))

    path = os.path.join(self.get_temp_dir(), f"{kind}.keras")
    dual.save(path)
    loaded = keras.models.load_model(path)
    self.assertEqual(heads.dual_output_names(loaded), names)
    for key, value in loaded.predict(self.x, verbose=0).items():
      self.assertAllClose(value, out[key], rtol=1e-6, atol=1e-7)
    for name in names:
      self.assertEqual(heads.variation_head_metadata(loaded, name),
                       heads.variation_head_metadata(dual, name))

    plain = heads.strip_variation_head(loaded)
    plain_out = plain(self.x)
    if kind == "dict":
      self.assertEqual(sorted(plain_out), names)
    else:
      self.assertLen(plain_out, 2)
    for i, name in enumerate(names):
      got = plain_out[name] if kind == "dict" else plain_out[i]
      expected = base_out[name] if kind == "dict" else base_out[i]
      self.assertAllClose(got, expected, atol=1e-6)
    return dual

  def _served_equals_in_process(self, dual, kind):
    base = os.path.join(self.get_temp_dir(), kind)
    path = saved_model.export_saved_model(dual, base, version=1,
                                          warmup_examples=self.x[:3])
    names = heads.dual_output_names(dual)
    meta = saved_model.read_export_metadata(path)
    self.assertEqual(meta["output_keys"], list(contract.output_keys(names)))
    self.assertEqual(sorted(meta["variation_head"]["outputs"]),
                     sorted(names))
    # One fit report per output at the top level, as each head stores it.
    self.assertEqual(
        meta["fit_report"],
        {n: heads.variation_head_metadata(dual, n)["fit_report"]
         for n in names})
    signature = tf.saved_model.load(path).signatures[
        contract.SERVING_SIGNATURE]
    self.assertEqual(sorted(signature.structured_outputs),
                     list(contract.output_keys(names)))
    # A row with a NaN input answers each head's cap, the others as in
    # process.
    nan = np.array(self.x[:3])
    nan[1, 0] = np.nan
    (input_name,) = signature.structured_input_signature[1]
    got = signature(**{input_name: tf.constant(nan)})
    finite = dual(nan[[0, 2]], training=False)
    for name in names:
      key = contract.variation_key(name)
      cap = heads.variation_output_layer(dual, name).max_value.numpy()
      self.assertEqual(got[key].numpy()[1], cap)
      self.assertAllClose(got[key].numpy()[[0, 2]], finite[key], rtol=1e-6,
                          atol=1e-6)
    x = self.x[:7]
    expected = dual(x, training=False)
    server = server_lib.ModelServer(
        [server_lib.model_config("multi", base)], port=0, poll_seconds=0,
        rest_api_port=0)
    with server:
      with client_lib.VariationClient(server.target, "multi") as client:
        served = client.predict(x)
        cli = client_cli.run_command("predict", client, x)
        cli_meta = client_cli.run_command("metadata", client)
      # TF Serving's REST JSON carries the same keys.
      with client_lib.VariationClient(f"127.0.0.1:{server.rest_api_port}",
                                      "multi", protocol="rest") as rest:
        over_rest = rest.predict(x)
    self.assertIsNone(served.prediction)
    self.assertEqual(sorted(served.predictions), sorted(names))
    self.assertEqual(sorted(served.variations), sorted(names))
    for name in names:
      for got, key in ((served.predictions[name],
                        contract.prediction_key(name)),
                       (served.variations[name], contract.variation_key(name)),
                       (cli["predictions"][name],
                        contract.prediction_key(name)),
                       (cli["variations"][name],
                        contract.variation_key(name)),
                       (over_rest.predictions[name],
                        contract.prediction_key(name)),
                       (over_rest.variations[name],
                        contract.variation_key(name))):
        self.assertAllClose(got, expected[key], rtol=1e-6, atol=1e-6)
    self.assertNotIn("outputs", cli)
    self.assertEqual(cli_meta["fit_report"], meta["fit_report"])
    self.assertEqual(sorted(cli_meta["fit_summary"]), sorted(names))
    for name in names:
      self.assertIn("held-out calibration inputs",
                    cli_meta["fit_summary"][name])
    json.dumps(cli)

  def test_dict_outputs_full_flow(self):
    self._served_equals_in_process(self._flow("dict"), "dict")

  def test_list_outputs_full_flow(self):
    self._served_equals_in_process(self._flow("list"), "list")

  def test_subclassed_list_outputs_full_flow(self):
    self._served_equals_in_process(self._flow("subclassed"), "subclassed")

  def test_statistic_per_output(self):
    model = tm.multi_output("dict")
    stats = {"klass": contract.STAT_PER_CLASS_STD,
             "value": contract.STAT_STD}
    t = targets.mc_dropout_targets(model, self.x[:10], num_samples=8,
                                   statistic=stats)
    self.assertEqual(t["klass"].shape, (10, tm.NUM_CLASSES))
    self.assertEqual(t["value"].shape, (10,))
    dual = heads.add_variation_head(model, statistic=stats)
    self.assertEqual(
        dual(self.x[:4])[contract.variation_key("klass")].shape,
        (4, tm.NUM_CLASSES))

  def test_train_variation_head_in_one_call(self):
    dual = training.train_variation_head(
        tm.multi_output("list"), self.x, num_samples=8, num_perturbed=64,
        epochs=1)
    self.assertEqual(heads.dual_output_names(dual), ["value", "klass"])
    for name in ("value", "klass"):
      self.assertEqual(
          heads.variation_head_metadata(dual, name)["num_samples"], 8)

  def test_fit_from_a_dataset_of_inputs_and_target_dicts(self):
    model = tm.multi_output("dict")
    t = targets.mc_dropout_targets(model, self.x, num_samples=8, seed=0)
    from_arrays = heads.add_variation_head(model, seed=0)
    training.fit_variation_head(from_arrays, self.x, t, epochs=1, seed=0)
    from_dataset = heads.add_variation_head(model, seed=0)
    training.fit_variation_head(
        from_dataset, tf.data.Dataset.from_tensor_slices((self.x, t)).batch(
            32), None, epochs=1, seed=0)
    want = from_arrays.predict(self.x, verbose=0)
    got = from_dataset.predict(self.x, verbose=0)
    for key in want:
      self.assertAllEqual(got[key], want[key], msg=key)

  def test_single_output_keys_are_unchanged(self):
    dual = heads.add_variation_head(tm.regression())
    self.assertEqual(sorted(dual.output), sorted(contract.OUTPUT_KEYS))
    self.assertIsNone(heads.dual_output_names(dual))
    self.assertEqual([l.name for l in dual.layers
                      if l.name.startswith(contract.HEAD_NAME)],
                     [contract.HEAD_NAME])

  def test_bad_targets_name_the_argument_and_output(self):
    model = tm.multi_output("dict")
    dual = heads.add_variation_head(model)
    t = targets.mc_dropout_targets(model, self.x[:40], num_samples=8)
    with self.assertRaisesRegex(
        ValueError, r"argument `targets`\. Expected a dict of target arrays "
        r"keyed by the output names \['klass', 'value'\]"):
      training.fit_variation_head(dual, self.x[:40], t["value"])
    with self.assertRaisesRegex(
        ValueError, r"argument `targets\['value'\]`\. Expected shape \(40,\)"):
      training.fit_variation_head(
          dual, self.x[:40], {"klass": t["klass"], "value": t["value"][:5]})
    with self.assertRaisesRegex(
        ValueError, r"argument `statistic`\. .*keyed by the output names"):
      targets.mc_dropout_targets(model, self.x[:4], num_samples=4,
                                 statistic={"value": "std"})

  def test_head_lookup_needs_an_output_name(self):
    dual = heads.add_variation_head(tm.multi_output("dict"))
    with self.assertRaisesRegex(
        ValueError, r"argument `output`\. Expected one of the dual model's "
        r"output names \['klass', 'value'\]\. Received: output=None"):
      heads.variation_head_metadata(dual)
    with self.assertRaisesRegex(ValueError, r"Received: output='nope'"):
      heads.variation_head(dual, "nope")

  def test_mc_dropout_signature_is_refused_for_several_outputs(self):
    dual = heads.add_variation_head(tm.multi_output("dict"))
    base = os.path.join(self.get_temp_dir(), "mc")
    with self.assertRaisesRegex(
        ValueError, r"argument `mc_num_samples`\. Expected None for a dual "
        r"of several outputs"):
      saved_model.export_saved_model(dual, base, mc_num_samples=4)
    self.assertFalse(os.path.exists(os.path.join(base, "1")))

  def test_moments_are_refused_for_several_outputs(self):
    with self.assertRaisesRegex(
        ValueError, r"argument `prior`\. Expected no moment propagation"):
      heads.add_variation_head(tm.multi_output("dict"), prior="moments")


if __name__ == "__main__":
  tf.test.main()
