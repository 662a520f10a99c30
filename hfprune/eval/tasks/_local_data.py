"""Functions the task configs in this folder name with ``!function _local_data.<name>``.

lm-evaluation-harness imports this file by its path. ``load`` reads a local split
(:func:`hfprune.eval.taskdata.load`); the WinoGrande prompt functions are the harness's own
(``lm_eval/tasks/winogrande/preprocess_winogrande.py``), re-exported unchanged.
"""

from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)

from hfprune.eval.taskdata import load  # noqa: F401
