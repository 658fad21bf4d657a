"""Task loaders: MovieLens (regression), Criteo (binary), images (multiclass).

Each loader returns a `Split(x_train, y_train, x_test, y_test, info)`.
"""

from dropvar_tf.study.data.common import BINARY
from dropvar_tf.study.data.common import MULTICLASS
from dropvar_tf.study.data.common import REGRESSION
from dropvar_tf.study.data.common import Split
from dropvar_tf.study.data.common import TASK_KINDS
from dropvar_tf.study.data.criteo import criteo_dataset
from dropvar_tf.study.data.criteo import load_criteo_tsv
from dropvar_tf.study.data.criteo import make_synthetic_criteo
from dropvar_tf.study.data.criteo import synthetic_criteo_records
from dropvar_tf.study.data.criteo import write_criteo_tsv
from dropvar_tf.study.data.images import load_digits
from dropvar_tf.study.data.images import load_emnist
from dropvar_tf.study.data.images import load_mnist_5k
from dropvar_tf.study.data.movielens import load_movielens_100k_widedeep
from dropvar_tf.study.data.movielens import load_movielens_raw
from dropvar_tf.study.data.movielens import load_movielens_tfds
