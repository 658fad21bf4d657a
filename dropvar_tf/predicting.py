"""`predict`: a model's predictions for inputs in any form every step takes.

Keras' `model.predict` takes arrays, dicts, lists, RaggedTensors and
Datasets, but refuses numpy string arrays of dtype `<U..` or `S..` (Keras
3.15: "Invalid dtype: str32"), for a plain model as for a dual. `predict`
reads its inputs as every other step does (`inputs.normalize`) and feeds
them to `model.predict` as a Dataset, which Keras takes in every form.
"""

from dropvar_tf import inputs
from dropvar_tf import validation


def predict(model, x, batch_size=32, verbose=0):
  """`model.predict(x)` for `x` in any form `inputs.normalize` reads.

  Args:
    model: a built Keras model: a dual from `add_variation_head`, or any
      plain model (subclassed ones included). It is not changed.
    x: the inputs: a numpy array (strings of dtype `<U..`, `S..` or object
      included), a list or dict of arrays, `tf.RaggedTensor`s for ragged
      inputs, or a finite `tf.data.Dataset` of examples or of batches, of
      `x` or of `(x, y)` (`y` is ignored); see docs/inputs.md.
    batch_size: examples per forward pass (a Dataset is rebatched to it).
    verbose: Keras' progress display: 0 (silent), 1, 2 or "auto".

  Returns:
    What `model.predict` returns: for a dual, the dict
    `{"prediction": (N, k), "variation": (N,)}` (and the keys of every
    output of a multi-output dual); for a plain model, its outputs. Rows are
    in the order of `x`.

  Raises:
    ValueError: `model` is not a built Keras model; `batch_size` is not an
      integer >= 1; or `x` does not match the model's inputs (naming `x`,
      as `inputs.normalize` does).

  Example:

    dual = dv.add_variation_head(model)   # model: keras.Input((), "string")
    out = dv.predict(dual, np.array(["red", "plum"]))
    out["variation"].shape                # (2,)
  """
  validation.check_model(model, allow_subclassed=True)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  data = inputs.normalize(model, x)
  return model.predict(data.as_dataset(batch_size), verbose=verbose)
