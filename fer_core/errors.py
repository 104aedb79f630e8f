"""The platform's error kinds, each with its own ``fer`` exit code.

Library code raises these for failures a *user* can act on; the CLI prints them as one line
(``fer: error: ...``) and exits with :attr:`FERError.exit_code`. Any other exception is a bug and
the CLI shows its traceback (exit :data:`EXIT_BUG`).

``UsageError`` and ``DataError`` also derive from :class:`ValueError` so callers (and tests) that
catch ``ValueError`` around library calls keep working; ``StateError`` and ``ServiceError`` do not:
they are not about a bad value.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and its outcome is "no" (a gate refused, a run failed)
EXIT_USAGE = 2  # bad arguments, options, recipe keys or values
EXIT_DATA = 3  # the input data is unreadable or malformed
EXIT_STATE = 4  # the workspace's state forbids it (conflict, missing run/version, lock held)
EXIT_SERVICE = 5  # an external service (Triton, MLflow server, Prefect API, S3) failed or is unreachable
EXIT_BUG = 70  # anything else: a bug (traceback printed); 70 = EX_SOFTWARE
EXIT_INTERRUPTED = 130

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "the command ran and refused or failed (e.g. a data gate or a promotion gate said no)"),
    (EXIT_USAGE, "usage: bad arguments, options, recipe keys or values"),
    (EXIT_DATA, "data: unreadable or malformed input data"),
    (EXIT_STATE, "state: the workspace forbids it (conflict, unknown run/version, lock held)"),
    (EXIT_SERVICE, "service: an external service (Triton, MLflow, Prefect, S3) failed or is unreachable"),
    (EXIT_BUG, "bug: an unexpected exception (its traceback is printed)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C or SIGTERM)"),
)


class FERError(Exception):
    """Base of the user-facing errors; ``exit_code`` is what ``fer`` exits with."""

    exit_code: int = EXIT_FAILED


class UsageError(FERError, ValueError):
    """A bad argument, option, recipe key or value."""

    exit_code = EXIT_USAGE


class DataError(FERError, ValueError):
    """Input data that cannot be read or does not have the expected shape/content."""

    exit_code = EXIT_DATA


class StateError(FERError):
    """The workspace's state forbids the operation (conflicting state, unknown run or version, lock held)."""

    exit_code = EXIT_STATE


class ServiceError(FERError):
    """An external service (Triton, an MLflow or Prefect server, an object store) failed or is unreachable."""

    exit_code = EXIT_SERVICE
