"""The one exception type that reaches a user as a single line.

Every bad-input condition (missing or malformed file, unknown backbone, mismatched
caches, schema violation) raises :class:`Stage1Error` with a message that names the
file/row/value and says how to fix it. The CLI prints it as one line and exits 2.
"""

from __future__ import annotations


class Stage1Error(Exception):
    """A user-facing error: what was wrong, the value received, and the fix."""

    exit_code = 2
