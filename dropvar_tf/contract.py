"""Names shared by the library, the exported SavedModel, the server and tests.

Defined once here; export, serving and tests import them. Never rely on names
Keras generates.
"""

# Output keys of the dual model and of the `serving_default` signature.
PREDICTION_KEY = "prediction"
VARIATION_KEY = "variation"
OUTPUT_KEYS = (PREDICTION_KEY, VARIATION_KEY)

# SavedModel signature names.
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
