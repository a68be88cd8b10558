"""Agreeing on the step at which a group of ranks stops, without a collective of the process group.

A stop signal (Ctrl-C, SIGTERM, Slurm's warning signal) reaches the ranks of a group at different
moments, or only some of them. They must still stop at the same step boundary, and the boundary
must be one before a step that the cache policy computes: a reused step stays free of any
communication. A collective for this would cost every computed step a round of the whole group;
instead the ranks meet in the rendezvous store (the same TCPStore the watchdog uses,
parallel/watchdog.py), which is cheap to read and never blocks:

- every rank counts the computed-step boundaries of the current video: ordinal k is the same on
  every rank of the group, because the ranks agree on which steps compute;
- a rank that has seen a signal, at its boundary k, proposes to stop at ordinal k + 2 (and the
  signal) with a compare-and-set on the video's key: the first proposal wins, later ones read it back;
- at every computed boundary where it does not yet know the stop ordinal, a rank checks the key
  (a non-blocking `check`, a `get` only once it is there), and it stops at the boundary whose ordinal
  equals it.

Why every rank learns the ordinal in time: the proposer set the key before it entered computed
step k, and no rank can finish computed step k before every rank of the group has entered it (the
step's collectives need all of them). So any other rank reaches its boundary k + 1 only after the
key was set, and reads it there at the latest: k + 1 < k + 2, the stop ordinal is never missed.

A group of one rank needs no store: it stops at the first computed boundary after the signal.
"""

from __future__ import annotations


class StopAgreement:
    """The stop ordinal of one group of ranks; `store` is None for a group of one rank.

    `begin(key)` before each video (the key names the video and the group, unique within the
    store's life), then `at_boundary(signum)` at every computed-step boundary, with the stop signal
    this rank has seen (None: none): True where the group stops. The proposal carries its signal, so
    every rank ends with the same one (`signum`), whichever rank saw it. `store_checks` counts this
    video's store round trips (for the run report)."""

    def __init__(self, store=None) -> None:
        self.store = store
        self.key: str | None = None
        self.ordinal = -1
        self.stop_at: int | None = None
        self.signum: int | None = None
        self.store_checks = 0

    def begin(self, key: str) -> None:
        self.key, self.ordinal, self.stop_at, self.signum, self.store_checks = key, -1, None, None, 0

    def at_boundary(self, signum: int | None) -> bool:
        """Called at every computed boundary, in order."""
        self.ordinal += 1
        k = self.ordinal
        if self.store is None:
            self.signum = signum
            return signum is not None
        if self.stop_at is None:
            self.store_checks += 1
            if signum is not None:
                value = self.store.compare_set(self.key, "", f"{k + 2} {signum}")
            else:
                value = self.store.get(self.key) if self.store.check([self.key]) else None
            if value is not None:
                stop_at, sig = value.decode().split()
                self.stop_at, self.signum = int(stop_at), int(sig)
            if self.stop_at is not None and self.stop_at < k:  # the argument in the module docstring failed
                raise RuntimeError(f"stop agreement: ordinal {self.stop_at} learned at ordinal {k}, too late")
        return self.stop_at == k
