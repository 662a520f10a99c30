"""The pruning pipeline: engine (block loop), runner (moves the blocks and their activations between
devices), calibration, allocation, distributed."""
