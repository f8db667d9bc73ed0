"""What the experiment scripts share about the run folders they reuse."""
from __future__ import annotations

import json

from gwnet.config import Config, fields_with_role, flatten
from gwnet.engine import RunDir
from gwnet.errors import GWNetError


def check_same_options(cfg: Config) -> None:
    """Refuse a run directory made with other options: its numbers would not be this run's."""
    path = RunDir(cfg.out).config
    if not path.exists():
        return
    saved = flatten(json.loads(path.read_text()))
    free = {f"{name}.{f}" for name, part in (("data", cfg.data), ("model", cfg.model), ("train", cfg.train))
            for f in fields_with_role(part, "runtime", "derived", "output")}
    now = flatten(cfg.to_dict())
    differ = [k for k, v in now.items() if k not in free and k != "out" and v is not None and saved.get(k) != v]
    if differ:
        raise GWNetError(f"{path.parent}: made with other options ({differ[0]} {saved.get(differ[0])!r} there, "
                         f"{now[differ[0]]!r} now); choose another --out")
