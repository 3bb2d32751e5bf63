"""Named points where the reliability tests make this process fail, to prove nothing is lost.

``CRITERIAPO_FAILPOINT=NAME:N[:SIGNAL]`` sends SIGNAL (default SIGKILL) to this process the N-th time
the point ``NAME`` is reached. Points: ``step`` (after an optimizer step), ``checkpoint-write`` (half
way through writing a checkpoint), ``checkpoint-publish`` (a checkpoint written but not yet renamed
into place), ``checkpoint-rotate`` (while an old checkpoint is being deleted). Unset, a point costs
one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CRITERIAPO_FAILPOINT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, rest = spec.partition(":")
    if want != name:
        return
    count, _, sig = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.Signals[sig or "SIGKILL"])
