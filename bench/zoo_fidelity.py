"""Fidelity of the default (cost-bounded) layer selection vs all layers.

Trains small versions of the four kinds of `zoo_cost_bench.py` briefly on
scikit-learn's digits (offline), then for each fits two heads on the same
MC targets of perturbed training images, the default one
(`add_variation_head(model)`, `layers="auto"`) and one tapping every
candidate layer (`layers="all"`), and prints their Spearman (and R^2 of
logs) against MC targets of held-out digits. Goal: the default within 0.02
Spearman of all layers. Each head is fitted with several seeds; the table
gives the mean over seeds.

The small versions and their data:
  efficientnet: EfficientNetB0 (weights=None, 10 classes) on the digits
    upsampled to 32x32 and tiled to RGB (0..255);
  mobilenet: MobileNetV2 (alpha 0.35) + Dropout(0.2) -> Dense(10) on the
    same images (-1..1);
  encoder: the BERT-style encoder with 4 blocks of width 64 over the 64
    pixels of a digit as tokens, each token id (position, intensity 0..16)
    so that the encoder sees where a pixel is;
  lstm: the LSTM text model (Embedding(32), LSTM(64)) over the 64 pixel
    intensities (0..16) in reading order.

  python bench/zoo_fidelity.py [--quick] [--models=lstm,encoder]
      [--num_samples=100] [--num_calibration=1000]
      [--calibration_samples=50] [--num_test=400]
"""

import argparse
import os
import sys
import time

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf import augment
from dropvar_tf import heads
from dropvar_tf import metrics
from dropvar_tf import targets
from dropvar_tf import training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_cost_bench as zoo  # noqa: E402  (a script beside this one)

IMAGE_SIZE = 32
LEVELS = 17  # digits pixel intensities 0..16
PIXELS = 64


def digits_split(seed=0, num_train=1200):
  """Digits as (x_train, y_train, x_test, y_test), 8x8 intensities 0..16."""
  from sklearn import datasets  # the study's dependency, data offline
  data = datasets.load_digits()
  order = np.random.default_rng(seed).permutation(len(data.target))
  x, y = data.images[order].astype("float32"), data.target[order]
  return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


def as_images(pixels, scale, offset):
  """8x8 intensities -> IMAGE_SIZE^2 RGB images in offset..offset+scale."""
  x = keras.ops.image.resize(pixels[..., None] / 16.0,
                             (IMAGE_SIZE, IMAGE_SIZE))
  x = np.clip(keras.ops.convert_to_numpy(x), 0.0, 1.0)
  return np.repeat(x, 3, axis=-1) * scale + offset


def as_positional_tokens(pixels):
  """Token id = position * 17 + intensity: where a pixel is and its value."""
  values = np.rint(pixels.reshape(len(pixels), PIXELS)).astype("int32")
  return values + LEVELS * np.arange(PIXELS, dtype="int32")


def as_tokens(pixels):
  return np.rint(pixels.reshape(len(pixels), PIXELS)).astype("int32")


# name: (builder, pixels -> model inputs, training epochs).
MODELS = {
    "efficientnet": (lambda: zoo.efficientnet(IMAGE_SIZE),
                     lambda p: as_images(p, 255.0, 0.0), 8),
    "mobilenet": (lambda: zoo.mobilenet(IMAGE_SIZE, width=0.35),
                  lambda p: as_images(p, 2.0, -1.0), 8),
    "encoder": (lambda: zoo.encoder(PIXELS, vocab=PIXELS * LEVELS, width=64),
                as_positional_tokens, 10),
    "lstm": (lambda: zoo.lstm_text(PIXELS, vocab=LEVELS, width=64, embed=32),
             as_tokens, 10),
}


def perturbed_pixels(pixels, num, seed):
  """`augment.perturb_inputs` on the intensities, kept within 0..16."""
  x = augment.perturb_inputs(pixels, num, seed=seed)
  return np.clip(x, 0.0, 16.0)


def trained_model(name, epochs=None):
  """One model of `MODELS` trained on the digits (seed 0), BatchNorm set.

  Returns:
    (model, pixels -> model inputs, digits_split()).
  """
  build, to_inputs, default_epochs = MODELS[name]
  split = digits_split()
  x_train, y_train = split[:2]
  keras.utils.set_random_seed(0)
  model = build()
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss="sparse_categorical_crossentropy", metrics=["accuracy"])
  model.fit(to_inputs(x_train), y_train, epochs=epochs or default_epochs,
            batch_size=64, verbose=0)
  # A few epochs leave BatchNorm's moving statistics far from the data's
  # (momentum 0.99), which makes the inference-mode model useless.
  zoo.calibrate_batchnorm(model, to_inputs(x_train[:256]))
  return model, to_inputs, split


def run(name, num_samples, num_calibration, num_test, seeds,
        calibration_samples, epochs=None):
  """Trains one model, fits both heads; returns a row of the table."""
  start = time.perf_counter()
  model, to_inputs, (x_train, _, x_test, y_test) = trained_model(name, epochs)
  accuracy = model.evaluate(to_inputs(x_test[:num_test]), y_test[:num_test],
                            verbose=0)[1]
  x_cal = to_inputs(perturbed_pixels(x_train, num_calibration, seed=0))
  x_eval = to_inputs(x_test[:num_test])
  t_cal = targets.mc_dropout_targets(
      model, x_cal, num_samples=calibration_samples, seed=0, batch_size=64,
      progress=False)
  t_eval = targets.mc_dropout_targets(model, x_eval, num_samples=num_samples,
                                      seed=1, batch_size=64, progress=False)
  bound = metrics.noise_bound(t_eval, num_samples)["correlation"]
  row = {"model": name, "accuracy": accuracy,
         "bound": float("nan") if bound is None else bound}
  for selection in ("auto", "all"):
    spearman, r2_log = [], []
    for seed in seeds:
      dual = heads.add_variation_head(model, layers=selection, seed=seed)
      training.fit_variation_head(dual, x_cal, t_cal, seed=seed,
                                  num_samples=calibration_samples)
      estimate = dual.predict(x_eval, batch_size=64, verbose=0)[
          "variation"]
      scores = metrics.fidelity(estimate, t_eval)
      spearman.append(scores["spearman"])
      r2_log.append(scores["r2_log"])
    row[selection] = (float(np.mean(spearman)), float(np.mean(r2_log)),
                      heads.variation_head_metadata(dual)["layers"])
    row[selection + "_seeds"] = spearman
  row["seconds"] = time.perf_counter() - start
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: few rows, T=10, one seed, 1 epoch")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--num_samples", type=int, default=100)
  parser.add_argument("--num_calibration", type=int, default=1000)
  parser.add_argument("--calibration_samples", type=int, default=50,
                      help="T of the targets the heads are fitted on")
  parser.add_argument("--num_test", type=int, default=400)
  parser.add_argument("--seeds", default="0,1")
  args = parser.parse_args(argv)
  names = args.models.split(",")
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  epochs = None
  if args.quick:
    args.num_samples, args.num_calibration, args.num_test = 10, 64, 32
    args.calibration_samples = 10
    seeds, epochs = seeds[:1], 1
  print(f"{args.num_calibration} perturbed training digits to fit on "
        f"(T={args.calibration_samples}), {args.num_test} held-out digits to "
        f"score on (T={args.num_samples}); "
        f"head seeds {seeds}")
  rows = []
  for name in names:
    row = run(name, args.num_samples, args.num_calibration, args.num_test,
              seeds, args.calibration_samples, epochs)
    rows.append(row)
    print(f"{name}: accuracy {row['accuracy']:.3f}; Spearman per seed: "
          f"auto {np.round(row['auto_seeds'], 3).tolist()}, all "
          f"{np.round(row['all_seeds'], 3).tolist()}; auto taps "
          f"{row['auto'][2]} of {len(row['all'][2])}; "
          f"{row['seconds']:.0f} s", flush=True)
  print("\n| model | test accuracy | default (auto) Spearman | all layers "
        "Spearman | difference | default R² (logs) | all R² (logs) | "
        "noise bound (correlation) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['model']} ({len(r['auto'][2])} of {len(r['all'][2])} "
          f"layers) | {r['accuracy']:.3f} | {r['auto'][0]:.3f} | "
          f"{r['all'][0]:.3f} | {r['auto'][0] - r['all'][0]:+.3f} | "
          f"{r['auto'][1]:.3f} | {r['all'][1]:.3f} | {r['bound']:.3f} |")
  return rows


if __name__ == "__main__":
  main()
