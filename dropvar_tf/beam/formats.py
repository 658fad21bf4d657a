"""Names of the Beam pipelines' file formats and key feature (no imports).

The command lines (`flags`) offer them before TensorFlow or Beam is loaded;
`records` and `sources` read and write the same names.
"""

KEY_FEATURE = "key"

TFRECORD = "tfrecord"
PARQUET = "parquet"
JSONL = "jsonl"
NPZ = "npz"
AUTO = "auto"

# Output formats of the targets and scoring pipelines.
TARGET_FORMATS = (TFRECORD, PARQUET)
SCORE_FORMATS = (TFRECORD, PARQUET, JSONL)
# Input formats ("auto": by file extension).
INPUT_FORMATS = (AUTO, TFRECORD, NPZ)
