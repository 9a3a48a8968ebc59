"""Overhead of ``reludoctor.keras.DoctorCallback`` on a Keras fit, as a ratio against a plain fit.

Two identical 784-128-64-10 MLPs train on the same random data; rounds alternate a plain
epoch of one and a watched epoch of the other, so machine noise hits both alike. Prints the
median ratio (watched / plain) with its interquartile range, and the same for two plain
models (the control). Target: watched / plain <= 1.10.

    python benchmarks/keras_overhead.py [--rounds 10] [--samples 60000] [--every 50]
                                        [--probe] [--no-targets]

By default the callback counts the training batches (its default); ``--probe`` gives it a
probe set of 256 rows instead. Each round is one ``fit`` call: the callback's re-tracing of
the training step at the start of every fit is in the figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from reludoctor.keras import DoctorCallback


def mlp() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False
    )
    return model


def epoch_seconds(model: keras.Model, x, y, callbacks) -> float:
    start = time.perf_counter()
    model.fit(x, y, epochs=1, batch_size=128, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return median, q1, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--probe", action="store_true", help="count a probe set of 256 rows")
    parser.add_argument(
        "--no-targets", action="store_true", help="with --probe: no gradient measurement"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.samples, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.samples)
    keras.utils.set_random_seed(0)
    plain, watched, control = mlp(), mlp(), mlp()
    if args.probe:
        targets = None if args.no_targets else y[:256]
        doctor = DoctorCallback(x[:256], targets, every=args.every, window=100)
    else:
        doctor = DoctorCallback(every=args.every, window=100)
    for model, callbacks in ((plain, []), (watched, [doctor]), (control, [])):
        epoch_seconds(model, x[:2048], y[:2048], callbacks)  # trace and warm up
    ratios, controls = [], []
    for _ in range(args.rounds):
        base = epoch_seconds(plain, x, y, [])
        ratios.append(epoch_seconds(watched, x, y, [doctor]) / base)
        controls.append(epoch_seconds(control, x, y, []) / base)
    steps = args.samples // 128
    print(
        f"784-128-64-10 MLP, batch 128, {steps} steps an epoch, "
        f"{'a probe of 256 rows' if args.probe else 'the training batch'} every "
        f"{args.every} steps, {'without' if args.probe and args.no_targets else 'with'} "
        f"gradients; {args.rounds} rounds"
    )
    print("                 median    q1      q3")
    print("watched / plain  {:.3f}   {:.3f}   {:.3f}".format(*quartiles(ratios)))
    print("control / plain  {:.3f}   {:.3f}   {:.3f}".format(*quartiles(controls)))
    print(
        f"plain epoch {base:.2f} s; target watched / plain <= 1.10: "
        f"{'met' if statistics.median(ratios) <= 1.10 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
