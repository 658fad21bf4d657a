"""Names shared by the library, the exported SavedModel, the server and tests.

Defined once here; export, serving and tests import them. Never rely on names
Keras generates.
"""

# Output keys of the dual model and of the `serving_default` signature.
PREDICTION_KEY = "prediction"
VARIATION_KEY = "variation"
OUTPUT_KEYS = (PREDICTION_KEY, VARIATION_KEY)

# A model with several outputs gets one variation per output, in the same
# dual model and the same signatures: "prediction/<name>" and
# "variation/<name>" for each output name (the keys of a dict output, the
# Keras output names of a Functional model's list output, "output_<i>" for
# a subclassed model's list output). Single-output models keep exactly
# OUTPUT_KEYS. The "/" survives SavedModel signature keys, TF Serving's REST
# JSON and gRPC output maps unchanged.
OUTPUT_SEPARATOR = "/"

# Optional output (`add_variation_head(out_of_range=True)`): how far an
# input's activation strengths lie outside the range the head was calibrated
# on, shape (batch,), float32, >= 0. One for the whole input, also in a dual
# of several outputs (the features it reads are the input's). Absent by
# default: key sets stay OUTPUT_KEYS / `output_keys(names)` exactly.
OUT_OF_RANGE_KEY = "out_of_range"


def prediction_key(output_name=None):
  """The key of an output's prediction: "prediction[/<output_name>]"."""
  if output_name is None:
    return PREDICTION_KEY
  return f"{PREDICTION_KEY}{OUTPUT_SEPARATOR}{output_name}"


def variation_key(output_name=None):
  """The key of an output's variation: "variation[/<output_name>]"."""
  if output_name is None:
    return VARIATION_KEY
  return f"{VARIATION_KEY}{OUTPUT_SEPARATOR}{output_name}"


def output_keys(output_names=None, out_of_range=False):
  """The dual's output keys: OUTPUT_KEYS, or two per named output (sorted).

  With `out_of_range`, OUT_OF_RANGE_KEY is appended.
  """
  if not output_names:
    keys = OUTPUT_KEYS
  else:
    keys = tuple(sorted(k for n in output_names
                        for k in (prediction_key(n), variation_key(n))))
  return keys + (OUT_OF_RANGE_KEY,) if out_of_range else keys


def per_output(outputs, kind):
  """{output name: value} of the "<kind>/<name>" entries of `outputs`.

  Args:
    outputs: a dict keyed by dual output keys (other keys are ignored).
    kind: PREDICTION_KEY or VARIATION_KEY.

  Returns:
    A dict keyed by output name; empty for a single-output dual.
  """
  prefix = kind + OUTPUT_SEPARATOR
  return {k[len(prefix):]: v for k, v in outputs.items()
          if k.startswith(prefix)}


def output_names(keys):
  """The output names that dual output `keys` hold, or None when invalid.

  Returns:
    `[]` for exactly OUTPUT_KEYS; the sorted names for a complete
    multi-output set ("prediction/<n>" and "variation/<n>" for each name);
    None for anything else. Either may also hold OUT_OF_RANGE_KEY.
  """
  keys = set(keys) - {OUT_OF_RANGE_KEY}
  if keys == set(OUTPUT_KEYS):
    return []
  names = sorted(k.split(OUTPUT_SEPARATOR, 1)[1] for k in keys
                 if k.startswith(PREDICTION_KEY + OUTPUT_SEPARATOR))
  if len(names) < 2 or keys != set(output_keys(names)):
    return None
  return names

# SavedModel signature names.
# The modules that register dropvar_tf's Keras-serializable classes: a
# `.keras` dual loads only once they are imported (`import dropvar_tf` does,
# and `cli_help.launch` for the package's own commands).
KERAS_OBJECT_MODULES = ("dropvar_tf.layers", "dropvar_tf.head_layers",
                        "dropvar_tf.moment_layers",
                        "dropvar_tf.seeded_dropout")

# The largest version TF Serving loads (its versions are int64): exports
# refuse larger ones, the server skips their folders.
MAX_VERSION = 2**63 - 1

SERVING_SIGNATURE = "serving_default"
MC_DROPOUT_SIGNATURE = "mc_dropout"

# Name of the head sub-model inside a dual model (`add_variation_head`).
HEAD_NAME = "variation_head"

# DPV statistics (what `mc_dropout_targets` computes and the head estimates).
# - "std": std over samples of each output unit (regression; binary
#   probability). Shape (N,) for one output unit, else (N, k).
# - "predicted_class_std": std of the probability of the class that the
#   deterministic pass predicts. Shape (N,).
# - "per_class_std": std of every class probability. Shape (N, k).
# - "auto": "std" for one output unit, "predicted_class_std" otherwise.
STAT_STD = "std"
STAT_PREDICTED_CLASS_STD = "predicted_class_std"
STAT_PER_CLASS_STD = "per_class_std"
STAT_AUTO = "auto"
STATISTICS = (STAT_AUTO, STAT_STD, STAT_PREDICTED_CLASS_STD, STAT_PER_CLASS_STD)

# Metadata written into exports (assets/<METADATA_FILENAME>, JSON).
METADATA_FILENAME = "dropvar_tf_metadata.json"
