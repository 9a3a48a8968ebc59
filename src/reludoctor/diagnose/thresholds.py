"""Every threshold the rules use, in one place (``rd.watch(thresholds=Thresholds(...))``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    """Every threshold a rule uses, overridable per call (``rd.watch(thresholds=...)``)."""

    #: Seed 002: "over ~40% dead units severely harms training".
    dead_error_fraction: float = 0.40
    #: A rise of this much in a layer's dead fraction across windows is "dying": well above
    #: the window-to-window jitter of healthy layers (a few points, in our controls).
    dying_rise: float = 0.10
    #: Relative loss improvement below this over a window is flat (seed 001's "flat loss").
    plateau_improvement: float = 0.01
    #: Once the loss fell by this much since the first window, a flat window is convergence.
    plateau_learned: float = 0.10
    #: A loss risen this much above its first step's (1.0: doubled) diverges.
    diverging_rise: float = 1.0
    #: Output spread across the batch (std over RMS) below this: the outputs are identical.
    #: Healthy networks show 0.1-1; seed 003's collapsed ones show exactly 0.
    identical_spread: float = 1e-3
    #: Earliest/latest layer gradient-norm ratio below this: gradients vanish with depth.
    vanishing_ratio: float = 1e-3
    #: ... above this, or a layer's gradient norm growing this much across windows: exploding.
    exploding_ratio: float = 1e3
    #: "Several times" off the He value (seed 003). PyTorch's default Linear/Conv init is
    #: 0.41x He and must not be flagged.
    init_scale_off: float = 4.0
    #: Pre-activation scale changing this much from the first to the last activation layer
    #: at the start: the initialisation shrinks or blows up the signal through depth.
    depth_signal_change: float = 100.0
    #: Fewer weights than this give no reliable estimate of their scale.
    init_scale_min_weights: int = 100
    #: Activation layers in one stack from which "deep" applies (seed 003, E5).
    deep_layers: int = 6
    #: Share of a layer's dead units that a negative bias holds below 0 to name the bias.
    negative_bias_share: float = 0.5
    #: A cause of death (a bias or shift holding units below 0) is named for a layer only
    #: when at least this share of its units are dead: a few silent units in a layer that
    #: fires sparsely is a known healthy pattern, not a problem with a cause.
    cause_min_dead_fraction: float = 0.10
    #: Largest per-step update-to-weight ratio taken as "large": healthy SGD/Adam runs stay
    #: near 1e-3-1e-2 (Karpathy's rule of thumb 1e-3); seed 003's lr=10 gives > 1.
    high_update_ratio: float = 0.5
    #: A step loss this many times the window's median is a spike.
    loss_spike: float = 10.0
    #: Dead fraction this much above the first batch's (which over-counts: a unit silent
    #: on one batch may fire on the next) means units died during training.
    died_during_training: float = 0.10
    #: Input features negative in >= 99% of samples, as a share of features, that makes the
    #: inputs "mostly negative" (seed 001: all of them).
    negative_inputs_share: float = 0.5
    #: |input mean| above this many input stds: not centred.
    off_centre: float = 3.0
