"""bench/zoo_rnn_features.py: its variants build the heads they name."""

import os
import sys

from dropvar_tf import heads
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import zoo_report  # noqa: E402  (scripts, not a package)
import zoo_rnn_features  # noqa: E402


class ZooRnnFeaturesTest(tf.test.TestCase):

  def test_variants_tap_and_probe_the_zoo_rnns_as_named(self):
    # Untrained models: which layers a head taps and what its probes
    # compute does not depend on the weights.
    expected = {
        "summary": {"rnn": "summary"},
        "auto": {"rnn": "neurons"},
        "input_summary": {"rows": "summary", "rnn": "summary"},
        "input_neurons": {"rows": "neurons", "rnn": "neurons"},
        "auto_wide": {"rnn": "neurons"},
    }
    for name in ("lstm", "gru"):
      model = zoo_report.KINDS[name].build()
      for variant, probes in expected.items():
        with self.subTest(model=name, variant=variant):
          head_kwargs, _ = zoo_rnn_features.VARIANTS[variant]
          meta = heads.variation_head_metadata(
              heads.add_variation_head(model, **head_kwargs))
          self.assertEqual(dict(zip(meta["layers"], meta["layer_features"])),
                           probes)

  def test_unknown_names_are_refused(self):
    for argv in (["--models=resnet"], ["--variants=bigger"]):
      with self.subTest(argv=argv):
        with self.assertRaises(SystemExit):
          zoo_rnn_features.main(["--quick"] + argv)


if __name__ == "__main__":
  tf.test.main()
