"""Export time with and without the TF Serving loading check.

  python bench/export_bench.py [--rounds=4]

Builds the main job's model (`dropvar`: a 2x256 MLP with dropout 0.3 on the
64 digits pixels, default variation head; untrained, the graph is what
costs) and exports it with 8 warm-up rows, alternating in one loop exports
with `export_checks.verify_serving_load` (the Session load, warm-up replay
and comparison that run before a version is published) and exports with
that step replaced by a no-op. Prints the medians and their ratio.
"""

import os
import sys
import tempfile
import time
from unittest import mock

from absl import app
from absl import flags
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from dropvar_tf import export_checks
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf.study.models import reference

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 4, "Exports of each kind.")


def main(argv):
  del argv
  base = reference.image_mlp((64,), 10, hidden=(256, 256), dropout_rate=0.3,
                             seed=0)
  dual = heads.add_variation_head(base)
  warmup = np.random.RandomState(0).rand(8, 64).astype("float32")
  out = tempfile.mkdtemp()
  # The first export traces the model's functions: not timed.
  saved_model.export_saved_model(dual, out, warmup_examples=warmup)
  times = {"with": [], "without": []}
  for _ in range(FLAGS.rounds):
    for mode in times:
      start = time.perf_counter()
      if mode == "with":
        saved_model.export_saved_model(dual, out, warmup_examples=warmup)
      else:
        with mock.patch.object(export_checks, "verify_serving_load"):
          saved_model.export_saved_model(dual, out, warmup_examples=warmup)
      times[mode].append(time.perf_counter() - start)
  with_check = float(np.median(times["with"]))
  without = float(np.median(times["without"]))
  print(f"export, median of {FLAGS.rounds}: with the Session check "
        f"{with_check:.2f} s, without {without:.2f} s, ratio "
        f"{with_check / without:.2f}x")


if __name__ == "__main__":
  app.run(main)
