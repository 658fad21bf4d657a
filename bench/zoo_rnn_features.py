"""What a recurrent model's head reads: variants fitted on the same targets.

For the LSTM and GRU of `zoo_report.py` (trained as there), and for the LSTM
text model of `zoo_fidelity.py` (Embedding -> SpatialDropout1D -> LSTM(64)
over a digit's 64 intensities as tokens), computes the calibration targets,
the bound's independent run and the reference once, then fits several heads
on those same targets and scores each against that same reference (Spearman
and R^2, `metrics.fidelity`), so that the variants differ only in the head.

Zoo LSTM/GRU: the recipe and sizes of `zoo_report.py` (2000 perturbed
training digits, T=100 targets, seed 0; 300 held-out digits, T=1000
reference, seed 3; bound: T=100, seed 2). Text LSTM: 1000 perturbed digits,
T=50 targets; 300 held-out digits, T=400 reference; bound T=50.

Variants (`VARIANTS`): "summary" (every probe a summary: the default before
`features="auto"`), "auto" (the default: a recurrent state per neuron),
and, for the zoo models, a wider head, more epochs, no prior, no delta, the
input tapped too (summaries, or per neuron with the state per neuron), and
the state per neuron with a wider head.

  python bench/zoo_rnn_features.py [--quick] [--models=lstm,gru,text_lstm]
      [--variants=summary,auto] [--seeds=0]
"""

import argparse
import os
import sys
import time

import numpy as np

from dropvar_tf import augment
from dropvar_tf import heads
from dropvar_tf import targets
from dropvar_tf import training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_fidelity as fid  # noqa: E402  (scripts beside this one)
import zoo_report as zr  # noqa: E402

STATISTIC = "predicted_class_std"
# name: (add_variation_head kwargs, fit_variation_head epochs).
VARIANTS = {
    "summary": (dict(features="summary"), zr.HEAD_EPOCHS),
    "auto": ({}, zr.HEAD_EPOCHS),
    "summary_wide": (dict(features="summary", hidden_units=(64, 64)),
                     zr.HEAD_EPOCHS),
    "summary_200_epochs": (dict(features="summary"), 200),
    "summary_no_prior": (dict(features="summary", prior=None),
                         zr.HEAD_EPOCHS),
    "summary_no_delta": (dict(features="summary", prior=None,
                              include_delta=False), zr.HEAD_EPOCHS),
    "input_summary": (dict(layers=["rows", "rnn"], features="summary"),
                      zr.HEAD_EPOCHS),
    "input_neurons": (dict(layers=["rows", "rnn"], features="neurons"),
                      zr.HEAD_EPOCHS),
    "auto_wide": (dict(hidden_units=(64, 64)), zr.HEAD_EPOCHS),
}
MODELS = ("lstm", "gru", "text_lstm")


def zoo_data(name, quick):
  """(model, fit_x, fit_t, x_eval, bound, reference, T) of a zoo RNN."""
  kind = zr.KINDS[name]
  model, (x_train, x_test), _ = zr.train_base(kind, quick)
  num_cal, t, num_test, ref_t = ((64, 10, 32, 50) if quick else
                                 (kind.num_calibration, kind.num_samples,
                                  kind.num_test, zr.REFERENCE_SAMPLES))
  x_eval = x_test[:num_test]
  fit_x = augment.perturb_inputs(x_train, num_cal, noise=zr.PERTURB_NOISE,
                                 swap=zr.PERTURB_SWAP, seed=0)
  return (model, fit_x, zr.mc(model, fit_x, t, 0, STATISTIC), x_eval,
          zr.mc(model, x_eval, t, zr.BOUND_SEED, STATISTIC),
          zr.mc(model, x_eval, ref_t, zr.REFERENCE_SEED, STATISTIC), t)


def text_data(quick):
  """The same for `zoo_fidelity.py`'s LSTM text model."""
  model, to_inputs, (x_train, _, x_test, _) = fid.trained_model(
      "lstm", epochs=1 if quick else None)
  num_cal, t, num_test, ref_t = (64, 10, 32, 50) if quick else (
      1000, 50, 300, 400)
  x_cal = to_inputs(fid.perturbed_pixels(x_train, num_cal, seed=0))
  x_eval = to_inputs(x_test[:num_test])

  def run(x, num_samples, seed):
    return targets.mc_dropout_targets(model, x, num_samples=num_samples,
                                      seed=seed, batch_size=64,
                                      progress=False)
  return (model, x_cal, run(x_cal, t, 0), x_eval, run(x_eval, t, 2),
          run(x_eval, ref_t, 3), t)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 1 epoch, few rows, small T")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--variants", default="summary,auto")
  parser.add_argument("--seeds", default="0", help="head seeds")
  args = parser.parse_args(argv)
  names = args.models.split(",")
  variants = args.variants.split(",")
  for what, given, known in (("models", names, MODELS),
                             ("variants", variants, list(VARIANTS))):
    unknown = [n for n in given if n not in known]
    if unknown:
      parser.error(f"unknown --{what} {unknown}; choose from {list(known)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  for name in names:
    start = time.perf_counter()
    model, fit_x, fit_t, x_eval, bound, ref, t = (
        text_data(args.quick) if name == "text_lstm" else
        zoo_data(name, args.quick))
    ref = np.asarray(ref, "float64").ravel()
    bound_scores = zr.scores(bound, ref)
    print(f"{name}: targets T={t} on {len(fit_t)} calibration inputs, "
          f"bound {bound_scores['spearman']:.3f} / {bound_scores['r2']:.3f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    for variant in variants:
      head_kwargs, epochs = VARIANTS[variant]
      if name == "text_lstm" and "layers" in head_kwargs:
        continue  # the zoo models' layer names
      for seed in seeds:
        dual = heads.add_variation_head(model, seed=seed, **head_kwargs)
        training.fit_variation_head(dual, fit_x, fit_t, epochs=epochs,
                                    batch_size=zr.HEAD_BATCH, seed=seed,
                                    num_samples=t)
        s = zr.scores(dual.predict(x_eval, verbose=0)["variation"], ref)
        meta = heads.variation_head_metadata(dual)
        rows.append({"model": name, "variant": variant, "seed": seed,
                     "head": s, "bound": bound_scores,
                     "layer_features": dict(zip(meta["layers"],
                                                meta["layer_features"]))})
        print(f"  {variant} (seed {seed}): {s['spearman']:.3f} / "
              f"{s['r2']:.3f}; probes {rows[-1]['layer_features']}",
              flush=True)
  print("\n| model | variant | head seed | head Spearman / R² | bound "
        "Spearman / R² |\n|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['model']} | {r['variant']} | {r['seed']} | "
          f"{r['head']['spearman']:.3f} / {r['head']['r2']:.3f} | "
          f"{r['bound']['spearman']:.3f} / {r['bound']['r2']:.3f} |")
  return rows


if __name__ == "__main__":
  main()
