"""The ``nvib`` command line: prior, prior-merge, search, evaluate, run, schema, tour and finetune.

Errors a user can fix (bad paths, malformed data or config, mismatched priors) are printed as one red
line with the fix, exit code 2, no traceback. Ctrl-C exits with 130; rerunning resumes.

``--help`` is built from the signatures alone: torch, transformers, optuna and pydantic are imported inside
the commands that run (``benchmarks/cli_speed.py`` measures it), so option defaults come from light modules.
"""

from nvib.cli import prior, runs, finetune  # noqa: F401, I001  (each registers its commands on `app`, in this order)
from nvib.cli.common import app

__all__ = ["app"]
