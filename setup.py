"""dropvar_tf: one-pass dropout prediction variation for Keras models."""

import os

import setuptools

_HERE = os.path.dirname(os.path.abspath(__file__))
_VERSION = {}
with open(os.path.join(_HERE, "dropvar_tf", "version.py")) as f:
  exec(f.read(), _VERSION)

REQUIRED = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.10,<4",
    "tensorflow-serving-api>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<5",
    # tfds 4.9.10 imports it on Python 3.11 but does not declare it.
    "importlib_resources",
    "absl-py>=2.1",
    "packaging>=23",
    "numpy>=1.26,<3",
    "scipy>=1.11",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "grpcio>=1.60",
    "aiohttp>=3.9",
    "requests>=2.31",
    "prometheus_client>=0.17",
]

EXTRAS = {
    # mmh3 is the reference the mask hash is tested against; scikit-learn
    # the one the R^2 and ROC AUC of `metrics` are.
    "test": ["pytest>=8", "hypothesis>=6.100", "pyarrow>=15", "mmh3>=4",
             "scikit-learn>=1.4", "ruff>=0.17,<0.18"],
    "data": ["pyarrow>=15"],
    # Beam's TensorFlow model handler imports tensorflow_hub; 0.16 is the
    # first that imports with TensorFlow 2.16+ (Beam's own extra pins older).
    "beam": ["apache-beam[tfrecord]>=2.60,<3", "tensorflow-hub>=0.16,<1",
             "pyarrow>=15", "google-crc32c>=1.5,<2"],
}

with open(os.path.join(_HERE, "README.md"), encoding="utf-8") as f:
  _README = f.read()

setuptools.setup(
    name="dropvar_tf",
    version=_VERSION["__version__"],
    description=("One-pass estimates of dropout prediction variation for "
                 "Keras models, exported and served with TF Serving."),
    long_description=_README,
    long_description_content_type="text/markdown",
    # `serving/` and `export/` sit at the top of the repository but install
    # inside the one package, as `dropvar_tf.serving` and `dropvar_tf.export`.
    packages=(setuptools.find_packages(include=["dropvar_tf", "dropvar_tf.*"])
              + ["dropvar_tf.serving", "dropvar_tf.export"]),
    package_dir={"dropvar_tf.serving": "serving",
                 "dropvar_tf.export": "export"},
    python_requires=">=3.10",
    install_requires=REQUIRED,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "dropvar=dropvar_tf.study.launch:run_main",
            "dropvar_model_server=dropvar_tf.cli_help:server_main",
            "dropvar_client=dropvar_tf.cli_help:client_main",
            "dropvar_export=dropvar_tf.cli_help:export_main",
        ],
    },
    license="Apache-2.0",
)
