"""The pruning pipeline: engine (block loop), runner (the only tensor mover), calibration, allocation, distributed."""
