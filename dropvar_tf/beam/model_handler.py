"""Beam's TensorFlow model handler for a signature of an exported SavedModel.

`RunInference` with Beam's `TFModelHandlerNumpy` loads a model with
`tf.keras.models.load_model` and calls it on one stacked array. An exported
dual SavedModel (`dropvar_tf.saved_model.export_saved_model`) is neither: it
is loaded with `tf.saved_model.load` and called through a signature
(`serving_default`) with named, possibly several, inputs. `SignatureHandler`
configures Beam's handler for that and nothing else; Beam still loads the
model once per worker process, batches the examples and records its own
inference metrics.

Each example is a dict {signature input name: one example's array}; with
`KeyedModelHandler` each element is a (key, example) pair and the key comes
back with its prediction. Every signature call has `batch_size` rows: a
batch is cut into calls of that many examples, and a shorter last call is
padded by repeating its last example, so every call runs the kernels of one
input shape and a score does not depend on how the runner bundled it. With
Beam's batching (`BatchElements`, at most `batch_size` examples) the end of
each bundle pads; the scoring pipeline batches by key instead
(`dropvar_tf.beam.batches`, and `with_no_batching()`), so that only the
run's last call pads:


    handler = KeyedModelHandler(SignatureHandler("/models/criteo/3"))
    (keyed_examples
     | RunInference(handler)              # -> (key, PredictionResult)
     | beam.MapTuple(lambda key, result: (key, result.inference["variation"])))
"""

import functools

from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy
import numpy as np

from dropvar_tf import contract
from dropvar_tf import validation
from dropvar_tf._keras import tf
from dropvar_tf.beam import counters


def load_signature(saved_model_dir, signature=contract.SERVING_SIGNATURE):
  """Loads a SavedModel and looks up one of its signatures.

  Args:
    saved_model_dir: a SavedModel folder (`<base>/<version>`).
    signature: the signature's name.

  Returns:
    (loaded SavedModel, signature function); keep the first alive while the
    second is used (it owns the variables).

  Raises:
    ValueError: the SavedModel has no signature `signature`.
  """
  loaded = tf.saved_model.load(saved_model_dir)
  if signature not in loaded.signatures:
    raise validation.invalid(
        "signature", f"one of the SavedModel's signatures "
        f"{sorted(loaded.signatures)}", signature)
  return loaded, loaded.signatures[signature]


def call_signature(signature, batch_size, model, batch, inference_args,
                   model_id=None):
  """Beam inference function: signature calls of `batch_size` rows each.

  Args:
    signature: name of the signature to call.
    batch_size: rows of every call: `batch` is cut into calls of this many
      examples, and a shorter last one is padded to it by repeating its last
      example (padded rows are dropped from the results and counted in the
      "examples_padded" counter).
    model: the loaded SavedModel (`SignatureHandler.load_model`).
    batch: sequence of dicts {input name: one example's array}, all with the
      same names.
    inference_args: extra keyword arguments of the signature call (tensors
      that are not batched), usually empty.
    model_id: the SavedModel path, recorded in the results.

  Returns:
    One `PredictionResult` per example, in order: `inference` is a dict
    {output name: that example's numpy array} of every signature output.
  """
  results = []
  for start in range(0, len(batch), batch_size):
    chunk = batch[start:start + batch_size]
    # Matmul kernels can round differently for different batch shapes; one
    # shape for every call makes each score independent of its batch mates.
    rows = list(range(len(chunk))) + [len(chunk) - 1] * (
        batch_size - len(chunk))
    if len(rows) > len(chunk):
      counters.counter("examples_padded").inc(len(rows) - len(chunk))
    inputs = {name: tf.constant(np.stack([chunk[i][name] for i in rows]))
              for name in chunk[0]}
    outputs = model.signatures[signature](**inputs, **inference_args)
    outputs = {name: value.numpy() for name, value in outputs.items()}
    results += [PredictionResult(
        example, {name: value[i] for name, value in outputs.items()},
        model_id) for i, example in enumerate(chunk)]
  return results


class SignatureHandler(TFModelHandlerNumpy):
  """`TFModelHandlerNumpy` for a SavedModel signature with named inputs.

  Loads the SavedModel with `tf.saved_model.load` (once per worker process,
  by `RunInference`) and calls `signature` on each batch with one stacked
  array per input name (`call_signature`). Batching is Beam's
  `BatchElements` with `batch_size` examples per batch; a smaller batch (the
  end of a bundle) is padded to `batch_size` rows.

  Args:
    saved_model_dir: a SavedModel folder, on a file system TensorFlow reads.
    signature: name of the signature to call.
    batch_size: rows of every signature call.

  Raises:
    ValueError: at `load_model`, the SavedModel has no signature `signature`.
  """

  def __init__(self, saved_model_dir, signature=contract.SERVING_SIGNATURE,
               batch_size=256):
    super().__init__(
        saved_model_dir,
        inference_fn=functools.partial(call_signature, signature, batch_size),
        min_batch_size=batch_size, max_batch_size=batch_size)
    self.saved_model_dir = saved_model_dir
    self.signature = signature

  def load_model(self):
    loaded, _ = load_signature(self.saved_model_dir, self.signature)
    return loaded

  def update_model_path(self, model_path=None):
    # Beam's model refresh (`watch_model_pattern`) swaps the path here.
    super().update_model_path(model_path)
    self.saved_model_dir = model_path or self.saved_model_dir
