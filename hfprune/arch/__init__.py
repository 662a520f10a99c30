"""Architecture knowledge: the one place that knows how each model family is laid out (:mod:`hfprune.arch.base`)."""

from hfprune.arch.base import *  # noqa: F401,F403
from hfprune.arch.base import __all__  # noqa: F401
