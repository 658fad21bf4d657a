"""Reference base models for the three task kinds, trained with Dropout."""

from dropvar_tf.study.models.reference import CategoricalOffsets
from dropvar_tf.study.models.reference import compile_for_task
from dropvar_tf.study.models.reference import criteo_model
from dropvar_tf.study.models.reference import image_cnn
from dropvar_tf.study.models.reference import image_mlp
from dropvar_tf.study.models.reference import movielens_model
from dropvar_tf.study.models.reference import train_base_model
