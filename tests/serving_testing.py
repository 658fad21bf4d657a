"""Tiny dual-output SavedModels for serving tests and benchmarks.

The models follow the serving contract (`serving_default` returning
{"prediction", "variation"}) without needing a trained variation head, so the
server and client can be tested on their own. `write_export` lays a model out
the way TF Serving expects: `<export_base>/<version>/saved_model.pb`;
`predict_request` builds the PredictRequest a test sends with the official
stubs.
"""

import os

import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import keras, tf
from dropvar_tf.serving import codec
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

import testing_models as tm

def _input_specs(model):
  """TensorSpecs named after the model's inputs, batch dimension free."""
  specs = {}
  for tensor in model.inputs:
    name = tensor.name.split(":")[0]
    specs[name] = tf.TensorSpec((None,) + tuple(tensor.shape[1:]),
                                tf.as_dtype(tensor.dtype), name=name)
  return specs


def write_export(model, export_base, version):
  """Exports `model` as `<export_base>/<version>/` with `serving_default`.

  Args:
    model: a model from this module (dict outputs with the contract keys).
    export_base: the folder a server polls.
    version: positive integer version.

  Returns:
    The version folder path.
  """
  specs = _input_specs(model)
  archive = keras.export.ExportArchive()
  archive.track(model)
  if len(specs) == 1:
    (spec,) = specs.values()

    def serve(x):
      outputs = model(x, training=False)
      return {key: outputs[key] for key in contract.OUTPUT_KEYS}

    archive.add_endpoint(contract.SERVING_SIGNATURE, serve,
                         input_signature=[spec])
  else:

    def serve(features):
      outputs = model(features, training=False)
      return {key: outputs[key] for key in contract.OUTPUT_KEYS}

    archive.add_endpoint(contract.SERVING_SIGNATURE, serve,
                         input_signature=[specs])
  path = os.path.join(export_base, str(int(version)))
  archive.write_out(path, verbose=False)
  return path


def dense_inputs(batch_size, seed=0):
  """Random float32 inputs for `tm.dual_dense_model`, shape (batch_size, 4)."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch_size, tm.DUAL_DENSE_FEATURES)).astype(
      np.float32)


def ratings_inputs(batch_size, seed=0):
  """Random inputs for `tm.dual_ratings_model`, a dict of numpy arrays."""
  rng = np.random.default_rng(seed)
  return {
      "user_id": rng.integers(0, tm.DUAL_NUM_USERS, size=batch_size,
                              dtype=np.int64),
      "movie_id": rng.integers(0, tm.DUAL_NUM_MOVIES, size=batch_size,
                               dtype=np.int64),
      "context": rng.normal(size=(batch_size, tm.DUAL_CONTEXT_FEATURES)).astype(
          np.float32),
  }


def predict_request(model, inputs, version=None, label=None, signature=None,
                    output_filter=()):
  """A PredictRequest, built without the client so any request can be sent.

  Args:
    model: the model name.
    inputs: {alias: array-like or TensorProto}; arrays are encoded with
      `codec.encode`, TensorProtos (malformed ones too) are sent as they are.
    version: a specific version, or None.
    label: a version label, or None.
    signature: the signature name; None leaves it empty (the default one).
    output_filter: output aliases to ask for.

  Returns:
    A `PredictRequest`.
  """
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  if version is not None:
    request.model_spec.version.value = version
  if label is not None:
    request.model_spec.version_label = label
  if signature is not None:
    request.model_spec.signature_name = signature
  for name, value in inputs.items():
    proto = value if isinstance(value, tensor_pb2.TensorProto) else (
        codec.encode(value))
    request.inputs[name].CopyFrom(proto)
  request.output_filter.extend(output_filter)
  return request
