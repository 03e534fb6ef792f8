"""One error type for bad input: what was wrong, where, and what to do.

Every user-facing failure (bad config, missing file, id out of range, fingerprint mismatch) raises
`KScaleError`; the `kscale` command prints its message and exits non-zero without a traceback.
"""

from __future__ import annotations


class KScaleError(Exception):
    """A user-facing error. `what` is the problem, `where` the file/key/id/rank, `fix` what to do."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"  where: {where}")
        if fix:
            parts.append(f"  fix:   {fix}")
        super().__init__("\n".join(parts))
