"""``gwnet-export``: a trained run as one file that forecasts on its own.

``--format pt2`` writes a ``torch.export`` program (load it with ``torch.export.load``, no
gwnet needed); ``--format onnx`` an ONNX model through torch's exporter (needs the
``export`` extra: onnxscript, onnxruntime), checked with onnxruntime. Either takes the raw
input window and returns the forecast in the data's unit; the file carries the sensor ids,
step, horizons, unit, protocol, input layout and scaler. The largest difference between the
file's forecast and the run's own on sample windows is measured and printed; an export above
the tolerance is refused. See docs/serving.md.
"""
from __future__ import annotations

import argparse

from ..engine.export import FORMATS
from .common import ArgumentParser, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gwnet-export", description=__doc__,
                            epilog="Example: gwnet-export runs/metr-la --format onnx --out metr-la.onnx")
    parser.add_argument("run", metavar="RUN_DIR", help="run directory (gwnet-train --out)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="file format")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    return parser


@run_cli("gwnet-export")
def main(argv: list[str] | None = None) -> int:
    from ..engine.export import export_run

    args = build_parser().parse_args(argv)
    meta = export_run(args.run, args.out, args.format, overwrite=args.overwrite)
    unit = f" {meta['unit']}" if meta.get("unit") else ""
    print(f"wrote {args.out}: {meta['model']} over {meta['num_sensors']} sensors, {meta['seq_len']} steps in, "
          f"{meta['horizon']} out ({meta['step_minutes']}-minute steps"
          + (f"; quantiles {', '.join(map(str, meta['output']['quantile_levels']))}"
             if "quantile_levels" in meta["output"] else "") + ")")
    print(f"max abs difference from the run's forecast: {meta['max_abs_difference']:.3g}{unit}")
    return 0
