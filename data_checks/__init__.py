"""Data gates: Great Expectations suites that a prepared dataset must pass before training.

::

    from data_checks import validate_dataset, GateBounds, GateFailed
    report = validate_dataset(root, docs_dir=workspace.gx_docs, bounds=GateBounds(min_class_fraction=0.01))
    report.raise_for_failure()

:mod:`data_checks.sample_checks` decodes every sample into columns, :mod:`data_checks.suites` holds
the per-task expectation suites, :mod:`data_checks.gate` runs them and writes Data Docs. This
package (not ``fer_core``) is where Great Expectations is imported.
"""

import os

# Before anything imports great_expectations: GX builds that send usage statistics read this, and
# the gate must stay offline.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from data_checks.gate import ExpectationOutcome, GateFailed, GateReport, validate_dataset  # noqa: E402
from data_checks.suites import GateBounds  # noqa: E402

__all__ = ["ExpectationOutcome", "GateBounds", "GateFailed", "GateReport", "validate_dataset"]
