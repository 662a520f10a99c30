"""Calibration statistics accumulated from a layer's inputs, all behind one protocol (:class:`Stats`)."""

from hfprune.stats.base import Stats
from hfprune.stats.channel import ChannelStats
from hfprune.stats.hessian import DenseTargetHessianStats, HessianStats
from hfprune.stats.moments import CrossMomentStats, MomentStats
from hfprune.stats.rownorm import RowNormStats

__all__ = ["Stats", "ChannelStats", "HessianStats", "DenseTargetHessianStats", "MomentStats", "CrossMomentStats", "RowNormStats"]
