"""Training callbacks. Order matters: producers of metrics run before the loggers, the checkpoint last."""

from mor_ds.train.callbacks.base import Callback
from mor_ds.train.callbacks.checkpoint import CheckpointCallback
from mor_ds.train.callbacks.evaluate import EvalCallback
from mor_ds.train.callbacks.faults import NonFiniteGuard
from mor_ds.train.callbacks.loss_curve import LossCurve
from mor_ds.train.callbacks.metrics import MetricsLogger
from mor_ds.train.callbacks.shard_audit import ShardAudit
from mor_ds.train.callbacks.signals import SignalHandler
from mor_ds.train.callbacks.throughput import Throughput
from mor_ds.train.callbacks.wandb_logger import WandbLogger

__all__ = ["Callback", "CheckpointCallback", "EvalCallback", "LossCurve", "MetricsLogger", "NonFiniteGuard",
           "ShardAudit", "SignalHandler", "Throughput", "WandbLogger"]
