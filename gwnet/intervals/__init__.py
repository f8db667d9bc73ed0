"""Calibrated forecast intervals for any run or ensemble.

:mod:`~gwnet.intervals.methods` (the registered methods: ``split`` conformal per horizon,
``normalized`` conformal with a per-sensor, per-hour difficulty, ``cqr`` for quantile runs),
:mod:`~gwnet.intervals.online` (the adaptive update under drift, fed reading by reading),
:mod:`~gwnet.intervals.metrics` (coverage, width, interval score, pinball, CRPS) and
:mod:`~gwnet.intervals.calibrate` (fitting on the validation split, streaming, the
``--latest`` state). ``gwnet.predict_intervals`` is the one-call Python entry.
"""
from ..registry import INTERVALS
from .calibrate import STATE_FILE, apply, calibrate, choose_method, start_online, stream
from .methods import (ConformalizedQuantiles, IntervalMethod, NormalizedConformal, SplitConformal, check_level,
                      conformal_quantile)
from .metrics import INTERVAL_METRICS, IntervalAccumulator, crps_from_quantiles, interval_pinball, winkler
from .online import OnlineConformal

__all__ = ["INTERVALS", "STATE_FILE", "apply", "calibrate", "choose_method", "start_online", "stream",
           "ConformalizedQuantiles", "IntervalMethod", "NormalizedConformal", "SplitConformal", "check_level",
           "conformal_quantile", "INTERVAL_METRICS", "IntervalAccumulator", "crps_from_quantiles",
           "interval_pinball", "winkler", "OnlineConformal"]
