"""Why the head is weak on EfficientNetB0: its DPV comes from drop-connect.

Trains the small EfficientNetB0 of `zoo_fidelity.py` (digits upsampled to
32x32 RGB, 8 epochs, BatchNorm statistics set from 256 training images) and
measures, on held-out digits against an MC reference of `--reference_samples`
(seed 3):

1. the targets: two runs of T=`--num_samples` (seeds 1 and 2) against each
   other and against the reference, the Gaussian `metrics.noise_bound` of
   such targets, and the excess kurtosis of the predicted class's
   probability over passes (Keras' own `model(x, training=True)`, BatchNorm
   frozen);
2. the sources: MC targets with only the top Dropout sampled, and with only
   the blocks' drop-connect Dropouts (`noise_shape=(None, 1, 1, 1)`: a
   block's whole residual branch is dropped for an example) sampled;
3. per-block sensitivity (two deterministic passes per drop-connect block:
   the branch kept at 1 / (1 - rate) and dropped): the DPV that the sum of
   single-block variances `rate (1 - rate) (p_keep - p_drop)**2` predicts,
   and each block's share of it;
4. what one pass shows: the prediction's entropy, each block's branch / skip
   L2 ratio, and the first-order (one backward pass) estimate of the
   block-drop variance;
5. the default head (`add_variation_head(model)`), fitted on the MC targets
   (T=`--num_samples`, seed 0) of perturbed training digits, for each
   calibration size of `--calibration`.

Every Spearman is against the reference.

  python bench/zoo_dropconnect.py [--num_test=200] [--num_samples=50]
      [--reference_samples=400] [--calibration=800,3000] [--quick]
"""

import argparse
import os
import sys
import time

import numpy as np
from scipy import stats

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf import heads
from dropvar_tf import metrics
from dropvar_tf import targets
from dropvar_tf import training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_fidelity as fid  # noqa: E402  (a script beside this one)

TOP = "top_dropout"


def spearman(a, b):
  return float(stats.spearmanr(a, b)[0])


def mc(model, x, num_samples, seed):
  return targets.mc_dropout_targets(model, x, num_samples=num_samples,
                                    seed=seed, batch_size=64, progress=False)


def drop_layers(model):
  return [l for l in model.layers if isinstance(l, keras.layers.Dropout)]


def with_rates(model, keep):
  """A copy of `model` (same weights) with the Dropouts not in `keep` off."""
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  for layer in drop_layers(copy):
    if not keep(layer.name):
      layer.rate = 0.0
  return copy


def keras_samples(model, x, num_samples, classes):
  """(T, N) predicted-class probabilities of `model(x, training=True)`,
  BatchNorm frozen (the reference of DESIGN.md), on a copy of `model`."""
  copy = with_rates(model, lambda name: True)
  for layer in copy.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.trainable = False
  call = tf.function(lambda z: copy(z, training=True))
  keras.utils.set_random_seed(7)
  rows = np.arange(len(classes))
  return np.stack([call(x).numpy()[rows, classes]
                   for _ in range(num_samples)])


def block_sensitivity(model, x, classes):
  """{drop-connect layer: rate (1 - rate) (p_keep - p_drop)**2}, (N,) each."""
  rows = np.arange(len(classes))
  out = {}
  for layer in drop_layers(model):
    if layer.name == TOP:
      continue
    call, rate = layer.call, layer.rate
    probs = []
    for factor in (1.0 / (1.0 - rate), 0.0):
      layer.call = lambda inputs, training=None, f=factor: inputs * f
      try:
        probs.append(model(x, training=False).numpy()[rows, classes])
      finally:
        layer.call = call
    out[layer.name] = rate * (1.0 - rate) * (probs[0] - probs[1]) ** 2
  return out


def one_pass_features(model, x, classes):
  """{name: (N,)}: each block's branch / skip L2 ratio, and the first-order
  block-drop std from the gradient of the predicted class's probability."""
  blocks = [l for l in drop_layers(model) if l.name != TOP]
  seen = {}

  def recording(name, call):
    def call_and_record(inputs, training=None):
      seen[name] = inputs
      return call(inputs, training=training)
    return call_and_record

  calls = {l.name: l.call for l in blocks}
  for layer in blocks:
    layer.call = recording(layer.name, layer.call)
  try:
    with tf.GradientTape() as tape:
      out = model(x, training=False)
      prob = tf.gather(out, classes, axis=1, batch_dims=1)
    grads = tape.gradient(prob, [seen[l.name] for l in blocks])
  finally:
    for layer in blocks:
      layer.call = calls[layer.name]
  n = len(classes)
  features, first_order = {}, np.zeros(n)
  skips = []
  for layer in blocks:
    add = model.get_layer(layer.name.replace("_drop", "_add"))
    skips += [t for t in add.input if t is not layer.output]
  skip_values = keras.Model(model.input, skips)(x, training=False)
  for layer, grad, skip in zip(blocks, grads, skip_values):
    branch = seen[layer.name]
    features[layer.name + " branch/skip"] = (
        np.linalg.norm(np.reshape(branch, (n, -1)), axis=1) /
        np.linalg.norm(np.reshape(skip, (n, -1)), axis=1))
    change = tf.reduce_sum(tf.reshape(grad * branch, (n, -1)), 1).numpy()
    first_order += layer.rate / (1.0 - layer.rate) * change ** 2
  features["first-order block-drop std (one backward pass)"] = np.sqrt(
      first_order)
  return features


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_test", type=int, default=200)
  parser.add_argument("--num_samples", type=int, default=50)
  parser.add_argument("--reference_samples", type=int, default=400)
  parser.add_argument("--source_samples", type=int, default=100)
  parser.add_argument("--calibration", default="800,3000")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 1 epoch, few rows, small T")
  args = parser.parse_args(argv)
  epochs = None
  if args.quick:
    args.num_test, args.num_samples, args.reference_samples = 32, 10, 20
    args.source_samples, args.calibration, epochs = 10, "64", 1
  start = time.perf_counter()
  model, to_inputs, (x_train, _, x_test, y_test) = fid.trained_model(
      "efficientnet", epochs)
  x = to_inputs(x_test[:args.num_test])
  probs = model.predict(x, batch_size=64, verbose=0)
  classes = probs.argmax(1)
  accuracy = float(np.mean(classes == y_test[:args.num_test]))
  quantiles = np.quantile(probs.max(1), [0, .1, .5, .9]).round(3).tolist()
  print(f"EfficientNetB0: test accuracy {accuracy:.3f} on {args.num_test} "
        f"held-out digits; predicted class's probability quantiles "
        f"(0, .1, .5, .9): {quantiles}")
  t = args.num_samples
  ref = mc(model, x, args.reference_samples, 3)
  run_a, run_b = mc(model, x, t, 1), mc(model, x, t, 2)
  print(f"\n1. targets (reference T={args.reference_samples}; DPV quantiles "
        f"(0, .5, 1): {np.quantile(ref, [0, .5, 1]).round(3).tolist()})")
  print(f"  T={t} run vs T={t} run: Spearman {spearman(run_a, run_b):.3f}, "
        f"Pearson {np.corrcoef(run_a, run_b)[0, 1]:.3f}")
  print(f"  T={t} runs vs reference: Spearman {spearman(run_a, ref):.3f} / "
        f"{spearman(run_b, ref):.3f}")
  print(f"  Gaussian noise_bound of T={t} targets: correlation "
        f"{metrics.noise_bound(run_a, t)['correlation']:.3f}")
  samples = keras_samples(model, x, args.source_samples, classes)
  print(f"  Keras' own passes (T={args.source_samples}): excess kurtosis of "
        f"the predicted class's probability, median over examples "
        f"{np.median(stats.kurtosis(samples, axis=0)):.2f}; passes where it "
        f"falls below 0.5: {np.mean(samples < 0.5):.3f}; their std vs "
        f"reference: Spearman {spearman(samples.std(0), ref):.3f}")

  print(f"\n2. sources (T={args.source_samples}, seed 4)")
  only_top = None
  for name, keep in (("top Dropout only", lambda n: n == TOP),
                     ("drop-connect only", lambda n: n != TOP)):
    dpv = mc(with_rates(model, keep), x, args.source_samples, 4)
    only_top = dpv if only_top is None else only_top
    print(f"  {name}: median DPV {np.median(dpv):.4f} (all sources "
          f"{np.median(ref):.4f}); Spearman {spearman(dpv, ref):.3f}")

  sens = block_sensitivity(model, x, classes)
  total = sum(sens.values())
  print("\n3. per-block sensitivity (2 deterministic passes per block)")
  print(f"  sqrt(sum of single-block variances + top-only variance): "
        f"Spearman {spearman(np.sqrt(total + only_top**2), ref):.3f}")
  print("  share of the summed variance: " + ", ".join(
      f"{k} {v.sum() / total.sum():.3f}" for k, v in sens.items()))

  print("\n4. one-pass features")
  entropy = -np.sum(probs * np.log(probs + 1e-12), axis=1)
  print(f"  prediction's entropy: Spearman {spearman(entropy, ref):.3f}")
  for name, value in one_pass_features(model, x, classes).items():
    block = name.split(" ")[0]
    own = (f"; vs its block's sensitivity {spearman(value, sens[block]):.3f}"
           if block in sens else "")
    print(f"  {name}: Spearman {spearman(value, ref):.3f}{own}")

  print(f"\n5. default head (T={t} targets of perturbed training digits)")
  for rows in [int(r) for r in args.calibration.split(",") if r]:
    x_cal = to_inputs(fid.perturbed_pixels(x_train, rows, seed=0))
    t_cal = mc(model, x_cal, t, 0)
    dual = heads.add_variation_head(model, seed=0)
    training.fit_variation_head(dual, x_cal, t_cal, seed=0, num_samples=t)
    estimate = dual.predict(x, batch_size=64, verbose=0)["variation"]
    report = heads.variation_head_metadata(dual).get("fit_report", {})
    print(f"  {rows} calibration rows: Spearman {spearman(estimate, ref):.3f}"
          f" (held-out calibration Spearman {report.get('spearman')})",
          flush=True)
  print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
