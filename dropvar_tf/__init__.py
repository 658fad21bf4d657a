"""dropvar_tf: one-pass dropout prediction variation (DPV) for Keras models.

  import dropvar_tf as dv
  dual = dv.add_variation_head(model, layers="all")
  targets = dv.mc_dropout_targets(model, x_cal, num_samples=100, seed=0)
  dv.fit_variation_head(dual, x_cal, targets)
  out = dual.predict(x)            # {"prediction": ..., "variation": ...}
"""

from dropvar_tf.version import __version__
from dropvar_tf import _keras  # Fails early, with a fix, on a bad Keras.
from dropvar_tf.augment import perturb_inputs
from dropvar_tf.contract import OUTPUT_KEYS
from dropvar_tf.contract import PREDICTION_KEY
from dropvar_tf.contract import SERVING_SIGNATURE
from dropvar_tf.contract import VARIATION_KEY
from dropvar_tf.sources import dropout_sources
from dropvar_tf.sources import register_dropout_source
from dropvar_tf.sources import unregister_dropout_source
from dropvar_tf.heads import add_variation_head
from dropvar_tf.heads import candidate_layers
from dropvar_tf.heads import has_variation_head
from dropvar_tf.heads import strip_variation_head
from dropvar_tf.heads import variation_head_metadata
from dropvar_tf.layers import ActivationProbe
from dropvar_tf.layers import ActivationStrength
from dropvar_tf.metrics import decile_table
from dropvar_tf.metrics import fidelity
from dropvar_tf.metrics import mc_convergence
from dropvar_tf.metrics import noise_ceiling
from dropvar_tf.moments import moment_model
from dropvar_tf.moments import moment_propagation_variation
from dropvar_tf.export_checks import check_serving_ops
from dropvar_tf.saved_model import export_saved_model
from dropvar_tf.saved_model import read_export_metadata
from dropvar_tf.seeded_dropout import mc_dropout_model
from dropvar_tf.targets import mc_dropout_targets
from dropvar_tf.training import fit_variation_head
from dropvar_tf.training import train_variation_head
