"""Ensembles of trained models: combine members per horizon, predict, report.

The package, in the order data flows: :mod:`~gwnet.ensemble.members` (runs of any registered
model, or reference checkpoints, and the data windowed for them), :mod:`~gwnet.ensemble.strategies`
(each strategy one registered function), :mod:`~gwnet.ensemble.combine` (the :class:`Ensemble`),
:mod:`~gwnet.ensemble.tables` (the prediction and metrics tables),
:mod:`~gwnet.ensemble.plots` and :mod:`~gwnet.ensemble.report` (:func:`run`: one output
directory).

Shleifer et al. (2019) found that a model trained for short horizons combined with one
trained for long horizons beats either alone. An :class:`Ensemble` holds such *members*
(run directories, or checkpoints of the reference implementations) and combines their
forecasts horizon by horizon, with one of the registered strategies (built in: three):

``mean``         the average of the members that forecast the horizon
``per-horizon``  the member with the lowest validation MAE at the horizon
``weighted``     non-negative weights per horizon: least squares on the validation readings
                 (NNLS). The weights are *not* normalised to sum to one: the least-squares
                 optimum is over all non-negative weights, so rescaling it would make it worse
                 on validation and lose the guarantee that it is no worse than the best single
                 member (every member alone is a feasible point); free scale also corrects a
                 bias the members share. Their sum is reported.

``per-horizon`` and ``weighted`` are fitted on the validation split of the data being
predicted (so on validation the per-horizon ensemble equals the best member at every
horizon). Members may forecast different numbers of horizons (a 6-horizon and a 12-horizon model):
the data are windowed with the largest, and a member with ``h`` horizons takes part in
horizons ``1..h`` only. Each member scales its inputs with its own scaler. Everything
streams in batches, so memory does not grow with the number of windows: fitting keeps
per-horizon sufficient statistics (MAE sums; ``X^T X`` and ``X^T y`` for NNLS), prediction
writes the table batch by batch.

:func:`run` writes one output directory, since one prediction makes several files that belong
together (every file written atomically)::

    predictions.csv        one row per origin, horizon and sensor: origin_time, target_time,
      (or .parquet)        sensor_id, horizon (1..H), prediction, actual (empty where unknown:
                           the future, or a missing reading; never 0)
    metrics.csv            model, horizon, mae, rmse, mape_pct of every member and the ensemble
    ensemble.json, .csv    how each horizon combines the members: weights, choice, validation MAE
    mae_by_horizon.png     MAE by horizon, members against the ensemble
    sensors.png            forecasts (+5 min and the last horizon) against readings over the
                           first day of the split at a few sensors
    adaptive_adjacency.png each member's learned adjacency softmax(relu(E1 E2))

With ``split="latest"`` it forecasts the next ``H`` steps after the last readings instead:
no actuals, so no metrics and no MAE plot, and the sensor plot shows the last day of
readings followed by the forecast.

Reference checkpoints (a ``.pth`` state_dict of the original implementations) join as
members through :func:`gwnet.nn.load_reference_checkpoint`, on the data's graph and with the
data's own fitted scaler, since such a file holds weights only.
"""
from ..registry import STRATEGIES
from .combine import Ensemble, Forecast
from .members import (ENSEMBLE, Member, check_compatible, data_config, load_ensemble_data, load_member,
                      load_members, load_reference_member, member_names)
from .plots import adaptive_adjacency, plot_adaptive_adjacency, plot_mae_by_horizon, plot_sensors
from .report import SPLITS, Report, run, split_windows
from .strategies import Strategy, Validation, nnls_from_gram, register_strategy
from .tables import COLUMNS, FORMATS, PredictionWriter, metrics_frame, tidy, write_predictions

__all__ = ["STRATEGIES", "Ensemble", "Forecast", "ENSEMBLE", "Member", "check_compatible", "data_config",
           "load_ensemble_data", "load_member", "load_members", "load_reference_member", "member_names",
           "adaptive_adjacency", "plot_adaptive_adjacency", "plot_mae_by_horizon", "plot_sensors", "SPLITS",
           "Report", "run", "split_windows", "Strategy", "Validation", "nnls_from_gram", "register_strategy",
           "COLUMNS", "FORMATS", "PredictionWriter", "metrics_frame", "tidy", "write_predictions"]
