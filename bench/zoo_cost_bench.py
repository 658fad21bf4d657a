"""Graph time of the default variation head on big models, side by side.

For each model of the zoo, prints the graph time of the default dual model
(`add_variation_head(model)`, `layers="auto"`) over its base at batch 32 and
256, next to the head that taps every candidate layer (`layers="all"`).
Graph time is measured as `dual_bench.py` measures it: several passes inside
one `tf.while_loop`, net of the empty loop's time, the functions taking
turns in rounds (in reversed order every other round), each ratio the median
of the per-round ratios; next to it, the ratio of the fastest rounds. Goal:
the default dual <= 1.05x its base on every model at both batch sizes.

The zoo (weights random except the BatchNorm statistics; a pass's time does
not depend on the weights):
  efficientnet: `keras.applications.EfficientNetB0` (weights=None, its own
    top Dropout, 10 classes) on `--image_size` RGB images;
  mobilenet: `keras.applications.MobileNetV2` (weights=None, average
    pooling) with Dropout(0.2) -> Dense(10) added on top;
  encoder: a BERT-style encoder, 4 blocks of width 256 (4 heads,
    MultiHeadAttention dropout 0.1, feed-forward 1024 with GELU, residual
    Dropout 0.1), mean pooling, Dropout -> Dense(10), on `--seq_len` tokens;
  lstm: Embedding(64) -> SpatialDropout1D -> LSTM(128, dropout and
    recurrent_dropout 0.2) -> Dropout -> Dense(10) on `--seq_len` tokens.
BatchNorm is calibrated: its moving statistics are set from one training-
mode pass over 128 images (scikit-learn's digits, upsampled and tiled to
RGB), so that the activations the probes read are realistic.

`--also_summary` adds a third dual, the default head with every probe a
summary (`features="summary"`, the default before recurrent states were read
per neuron), timed in the same rounds.

  python bench/zoo_cost_bench.py [--quick] [--models=efficientnet,lstm]
      [--batch_sizes=32,256] [--image_size=64] [--seq_len=32]
      [--repeats=7] [--also_summary]
"""

import argparse
import os
import sys
import time

import numpy as np

from dropvar_tf._keras import keras, tf
from dropvar_tf import heads

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dual_bench  # noqa: E402  (a script beside this one)

VOCAB = 1000
CLASSES = 10


def digit_images(n, size, seed=0):
  """`n` digits images (0..1) upsampled to size x size, tiled to 3 channels.

  Args:
    n: how many (drawn with replacement from the 1,797 digits).
    size: output height and width, in pixels.
    seed: seed of the draw.

  Returns:
    A float32 array of shape (n, size, size, 3).
  """
  from sklearn import datasets  # the study's dependency, data offline
  images = datasets.load_digits().images.astype("float32") / 16.0
  rng = np.random.default_rng(seed)
  x = images[rng.integers(0, len(images), n)][..., None]
  x = tf.image.resize(x, (size, size)).numpy()
  return np.repeat(np.clip(x, 0.0, 1.0), 3, axis=-1)


def efficientnet(image_size=64, classes=CLASSES):
  """EfficientNetB0 (weights=None) taking images in 0..255 (it rescales)."""
  return keras.applications.EfficientNetB0(
      include_top=True, weights=None, classes=classes,
      input_shape=(image_size, image_size, 3))


def mobilenet(image_size=64, classes=CLASSES, width=1.0):
  """MobileNetV2 (weights=None, `alpha=width`) + Dropout(0.2) -> Dense.

  Flat: the backbone's layers are the model's own, so each can be tapped.
  Takes images in -1..1.
  """
  backbone = keras.applications.MobileNetV2(
      include_top=False, weights=None, pooling="avg", alpha=width,
      input_shape=(image_size, image_size, 3))
  h = keras.layers.Dropout(0.2, name="top_dropout")(backbone.output)
  out = keras.layers.Dense(classes, activation="softmax",
                           name="predictions")(h)
  return keras.Model(backbone.input, out, name="mobilenetv2")


def encoder(seq_len=32, vocab=VOCAB, classes=CLASSES, width=256, blocks=4,
            num_heads=4, rate=0.1):
  """A BERT-style encoder: post-norm blocks, MHA and GELU feed-forward."""
  tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
  x = keras.layers.Embedding(vocab, width, name="embedding")(tokens)
  x = keras.layers.LayerNormalization(name="embedding_norm")(x)
  x = keras.layers.Dropout(rate, name="embedding_dropout")(x)
  for b in range(blocks):
    a = keras.layers.MultiHeadAttention(
        num_heads, width // num_heads, dropout=rate, name=f"b{b}_mha")(x, x)
    a = keras.layers.Dropout(rate, name=f"b{b}_mha_dropout")(a)
    x = keras.layers.LayerNormalization(name=f"b{b}_mha_norm")(
        keras.layers.Add(name=f"b{b}_mha_add")([x, a]))
    f = keras.layers.Dense(4 * width, activation="gelu",
                           name=f"b{b}_ffn_in")(x)
    f = keras.layers.Dense(width, name=f"b{b}_ffn_out")(f)
    f = keras.layers.Dropout(rate, name=f"b{b}_ffn_dropout")(f)
    x = keras.layers.LayerNormalization(name=f"b{b}_ffn_norm")(
        keras.layers.Add(name=f"b{b}_ffn_add")([x, f]))
  h = keras.layers.GlobalAveragePooling1D(name="pool")(x)
  h = keras.layers.Dropout(rate, name="top_dropout")(h)
  out = keras.layers.Dense(classes, activation="softmax", name="out")(h)
  return keras.Model(tokens, out, name="encoder")


def lstm_text(seq_len=32, vocab=VOCAB, classes=CLASSES, width=128,
              embed=64):
  """Embedding -> SpatialDropout1D -> LSTM (both dropouts) -> Dropout."""
  tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
  x = keras.layers.Embedding(vocab, embed, name="embedding")(tokens)
  x = keras.layers.SpatialDropout1D(0.2, name="embedding_dropout")(x)
  x = keras.layers.LSTM(width, dropout=0.2, recurrent_dropout=0.2,
                        name="lstm")(x)
  x = keras.layers.Dropout(0.3, name="top_dropout")(x)
  out = keras.layers.Dense(classes, activation="softmax", name="out")(x)
  return keras.Model(tokens, out, name="lstm_text")


def calibrate_batchnorm(model, x):
  """Sets every BatchNorm's moving statistics from one training-mode pass.

  With momentum 0 the moving mean and variance become the batch's; each
  layer sees inputs normalised by the layers before it, as at inference.
  Dropout is on during that pass, as in training.
  """
  norms = [l for l in keras_graph_layers(model)
           if isinstance(l, keras.layers.BatchNormalization)]
  momenta = [l.momentum for l in norms]
  for l in norms:
    l.momentum = 0.0
  model(x, training=True)
  for l, m in zip(norms, momenta):
    l.momentum = m
  return len(norms)


def keras_graph_layers(model):
  """Every layer of `model`, nested models' layers included."""
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):
      yield from keras_graph_layers(layer)


def image_input(scale, offset):
  def make(n, size, seed):
    return digit_images(n, size, seed) * scale + offset
  return make


def token_input(n, seq_len, seed):
  """Token ids with a Zipf-like frequency, as in text."""
  rng = np.random.default_rng(seed)
  return np.minimum(rng.zipf(1.3, (n, seq_len)), VOCAB - 1).astype("int32")


# name: (description, builder(size), input maker(n, size, seed), size arg).
MODELS = {
    "efficientnet": ("EfficientNetB0, weights=None, top Dropout 0.2",
                     efficientnet, image_input(255.0, 0.0), "image_size"),
    "mobilenet": ("MobileNetV2, weights=None, + Dropout(0.2) -> Dense",
                  mobilenet, image_input(2.0, -1.0), "image_size"),
    "encoder": ("BERT-style encoder, 4 blocks, width 256, MHA dropout 0.1",
                encoder, token_input, "seq_len"),
    "lstm": ("LSTM(128) text model, Embedding(64), SpatialDropout1D, "
             "recurrent dropout", lstm_text, token_input, "seq_len"),
}


def build(name, size, seed=0):
  """Returns (base model with calibrated BatchNorm, input maker)."""
  _, builder, make_input, _ = MODELS[name]
  keras.utils.set_random_seed(seed)
  model = builder(size)
  calibrate_batchnorm(model, make_input(128, size, seed + 1))
  return model, make_input


def passes_for(batch, quick):
  """Passes per timed graph loop: enough to dwarf the loop's own time."""
  if quick:
    return 2
  return 10 if batch <= 32 else 3


def time_rounds(forwards, x, passes, repeats):
  """Times `forwards` (one named "base") in one graph loop each, in rounds.

  Like `dual_bench.time_in_graph` (`passes` passes in a `tf.while_loop`, net
  of the empty loop), but the order is reversed every other round, so that
  drift within a round does not favour one side, and both estimates are
  kept: per-round paired ratios, and the ratio of the fastest rounds (on a
  shared machine the fastest round is the least disturbed one).

  Returns:
    ({name: median s per pass, net of the loop}, {name: per-round net
    ratios to the base}, {name: net ratio of the fastest rounds}, the
    empty loop's s per pass).
  """
  loops = {"loop": dual_bench.in_graph(lambda t: t, passes)}
  loops.update({k: dual_bench.in_graph(f, passes)
                for k, f in forwards.items()})
  for fn in loops.values():
    for _ in range(2):
      fn(x).numpy()  # trace and warm up
  samples = {k: [] for k in loops}
  for r in range(repeats):
    for k in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
      start = time.perf_counter()
      loops[k](x).numpy()
      samples[k].append((time.perf_counter() - start) / passes)
  t = {k: np.asarray(v) for k, v in samples.items()}
  net = {k: t[k] - t["loop"] for k in forwards}
  paired = {k: net[k] / net["base"] for k in forwards}
  best = {k: (t[k].min() - t["loop"].min()) /
          (t["base"].min() - t["loop"].min()) for k in forwards}
  return ({k: float(np.median(v)) for k, v in net.items()}, paired, best,
          float(np.median(t["loop"])))


def measure(name, size, batch_sizes, repeats, quick, also_summary=False):
  """Prints and returns {batch: {kind: (per-round ratios, best ratio)}}.

  Kinds: "auto" (the default dual), "all" (every candidate layer tapped),
  and with `also_summary` "summary" (the default taps, summary probes).
  """
  base, make_input = build(name, size)
  duals = {"auto": heads.add_variation_head(base),
           "all": heads.add_variation_head(base, layers="all")}
  if also_summary:
    duals["summary"] = heads.add_variation_head(base, features="summary")
  taps = {k: heads.variation_head_metadata(d)["layers"]
          for k, d in duals.items()}
  print(f"\n{name}: {MODELS[name][0]}; {MODELS[name][3]}={size}; "
        f"{len(taps['all'])} candidate layers; default (auto) taps "
        f"{taps['auto']}")
  results = {}
  for batch in batch_sizes:
    x = tf.constant(make_input(batch, size, 2))
    forwards = {"base": lambda t, m=base: m(t, training=False)}
    forwards.update({k: (lambda t, m=d: m(t, training=False))
                     for k, d in duals.items()})
    passes = passes_for(batch, quick)
    times, paired, best, loop = time_rounds(forwards, x, passes, repeats)
    results[batch] = {k: (paired[k], best[k]) for k in duals}
    print(f"  batch {batch}: base {times['base'] * 1e3:.2f} ms a pass "
          f"({passes} passes a loop, net of the loop's "
          f"{loop * 1e3:.3f} ms); default (auto) "
          f"{dual_bench.ratio_text(paired['auto'])}, fastest rounds "
          f"{best['auto']:.3f}x; all layers "
          f"{dual_bench.ratio_text(paired['all'])}, fastest rounds "
          f"{best['all']:.3f}x" + (
              f"; summary probes {dual_bench.ratio_text(paired['summary'])}"
              f", fastest rounds {best['summary']:.3f}x"
              if also_summary else ""))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: small inputs, few rounds")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--batch_sizes", default="32,256")
  parser.add_argument("--image_size", type=int, default=None,
                      help="default 64 (32 with --quick)")
  parser.add_argument("--seq_len", type=int, default=None,
                      help="default 32 (8 with --quick)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timing rounds (default 7, 2 with --quick)")
  parser.add_argument("--also_summary", action="store_true",
                      help="also time the default taps with summary probes "
                      "(features=\"summary\")")
  args = parser.parse_args(argv)
  names = args.models.split(",")
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  sizes = {"image_size": args.image_size or (32 if args.quick else 64),
           "seq_len": args.seq_len or (8 if args.quick else 32)}
  repeats = args.repeats or (2 if args.quick else 7)
  threads = tf.config.threading
  print(f"graph time, dual / base (median of {repeats} paired rounds, IQR); "
        f"TF threads: intra {threads.get_intra_op_parallelism_threads()}, "
        f"inter {threads.get_inter_op_parallelism_threads()} (0: TF's choice)")
  table = {}
  for name in names:
    table[name] = measure(name, sizes[MODELS[name][3]], batch_sizes, repeats,
                          args.quick, args.also_summary)
  print("\n| model | " + " | ".join(
      f"default / base, batch {b} | all layers / base, batch {b}"
      for b in batch_sizes) + " |")
  print("|---|" + "---:|" * (2 * len(batch_sizes)))
  for name, rows in table.items():
    cells = []
    for b in batch_sizes:
      cells += [f"{np.median(rows[b][k][0]):.2f}x ({rows[b][k][1]:.2f}x)"
                for k in ("auto", "all")]
    print(f"| {name} | " + " | ".join(cells) + " |")
  print("(median of per-round ratios; in brackets, the ratio of the fastest "
        "rounds)")
  return table


if __name__ == "__main__":
  main()
