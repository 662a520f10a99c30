"""What a command pays before it starts: building the ``hfprune`` parser must not import the training stack.

Every command builds the whole parser (``hfprune recover``'s flags come from ``RecoveryArguments``);
importing ``transformers.Trainer``, peft, ``datasets`` and pandas there cost every ``hfprune prune
--low-memory`` run about 190 MB of peak RSS.
"""

import subprocess
import sys

HEAVY = ("transformers.trainer", "transformers.trainer_callback", "peft", "datasets", "pandas")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_cli_parser_does_not_import_the_training_stack():
    assert _imported_after("from hfprune.cli.main import build_parser; build_parser()") == []


def test_training_names_still_resolve():
    code = ("from hfprune.training import DistillationTrainer, masks_from_zeros, GradualPruner, merge_lora_keep_sparsity\n"
            "from hfprune.workflows.recovery import RecoveryArguments, arguments_from, recover, TimeBudgetCallback\n"
            "import hfprune.training as t; assert 'DistillationTrainer' in dir(t)")
    assert "transformers.trainer" in _imported_after(code)
