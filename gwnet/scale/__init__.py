"""Scaling Graph WaveNet up: sharded training over processes and machines, 8-bit optimizers.

:mod:`~gwnet.scale.world` joins the processes ``torchrun`` starts, :mod:`~gwnet.scale.backbone`
shards a model with FSDP2 and moves its state in and out of shards,
:mod:`~gwnet.scale.trainer` is the Trainer over processes (what ``--fsdp`` runs) and
:mod:`~gwnet.scale.optim` the 8-bit AdamW (``--optimizer adamw8bit``, needs torchao).
From Python::

    with gwnet.scale.distributed(cfg):   # under torchrun, cfg.train.fsdp = True
        gwnet.train(cfg)
"""
from .world import World, current_world, distributed, is_main_process, launch

__all__ = ["World", "current_world", "distributed", "is_main_process", "launch"]
