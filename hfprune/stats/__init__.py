"""Calibration statistics accumulated from a layer's inputs, all behind one protocol (:class:`Stats`)."""

from hfprune.stats.base import Stats
from hfprune.stats.channel import ChannelStats
from hfprune.stats.hessian import CrossStats, HessianStats
from hfprune.stats.moments import MomentStats
from hfprune.stats.rownorm import RowNormStats

__all__ = ["Stats", "ChannelStats", "HessianStats", "CrossStats", "MomentStats", "RowNormStats"]
