"""A Hydra Slurm sweep's job stopped at a checkpoint is requeued by its rank 0 (runner/requeue.py):
the logic with a fake store and a fake scontrol here; on a real Slurm in tests/test_slurm_requeue.py."""

import os
import signal
import threading

import pytest

from runner import cli, requeue

JOB = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42"}


class FakeStore:
    def __init__(self):
        self.counts, self.lock = {}, threading.Lock()

    def add(self, key, n):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n
            return self.counts[key]


class FakeRun:
    def __init__(self, rc=0):
        self.calls, self.rc = [], rc

    def __call__(self, cmd, **kw):
        self.calls.append(cmd)
        return type("R", (), {"returncode": self.rc, "stdout": "", "stderr": "Requested operation is presently disabled"})()


def test_outside_submitit_nothing_happens():
    run = FakeRun()
    assert requeue.after_stop(signal.SIGUSR2, 0, 1, env={"SLURM_JOB_ID": "42"}, run=run, store=FakeStore()) is None
    assert not run.calls and requeue.stop_signals({"SLURM_JOB_ID": "42"}) == ()


def test_rank_0_requeues_on_the_preemption_signal_once_every_rank_has_checkpointed():
    store, run = FakeStore(), FakeRun()
    # rank 1 is still writing its shard when rank 0 gets there: rank 0 waits for it
    late = threading.Timer(0.3, lambda: requeue.after_stop(signal.SIGUSR2, 1, 2, env=JOB, run=run, store=store))
    late.start()
    note = requeue.after_stop(signal.SIGUSR2, 0, 2, env=JOB, run=run, store=store)
    late.join()
    assert run.calls == [["scontrol", "requeue", "42"]] and note == "job 42 requeued: it resumes from the checkpoint"
    assert store.counts == {"42/0": 2}


def test_a_rank_that_never_stops_delays_the_requeue_only_up_to_the_timeout():
    store, run = FakeStore(), FakeRun()
    note = requeue.after_stop(signal.SIGUSR2, 0, 2, timeout_s=0.2, env=JOB, run=run, store=store)
    assert run.calls and "(1 of 2 ranks had not checkpointed)" in note


def test_sigterm_checkpoints_without_requeueing_and_other_ranks_never_requeue():
    store, run = FakeStore(), FakeRun()
    assert requeue.after_stop(signal.SIGTERM, 0, 1, env=JOB, run=run, store=store) is None
    assert requeue.after_stop(signal.SIGUSR2, 1, 2, env=JOB, run=run, store=store) is None
    assert not run.calls and store.counts == {"42/0": 2}


def test_a_failed_requeue_says_how_to_resume():
    note = requeue.after_stop(signal.SIGUSR2, 0, 1, env=JOB, run=FakeRun(rc=1), store=FakeStore())
    assert "could not be requeued (Requested operation is presently disabled)" in note and "again" in note


def test_the_preemption_signal_follows_submitits_setting():
    assert requeue.preempt_signal(JOB) == signal.SIGUSR2
    assert requeue.preempt_signal({**JOB, "SUBMITIT_PREEMPT_SIGNAL": "USR1"}) == signal.SIGUSR1
    assert requeue.preempt_signal({**JOB, "SUBMITIT_PREEMPT_SIGNAL": "SIGTERM"}) == signal.SIGTERM
    assert requeue.stop_signals(JOB) == (signal.SIGUSR2,)
    with pytest.raises(ValueError, match="not a signal"):
        requeue.preempt_signal({**JOB, "SUBMITIT_PREEMPT_SIGNAL": "NOPE"})


def test_the_preemption_signal_is_a_stop_signal_once_handled():
    cli.stop_on_signals((signal.SIGUSR2,))
    try:
        with pytest.raises(cli.Interrupted) as info:
            os.kill(os.getpid(), signal.SIGUSR2)
            signal.sigtimedwait([], 0.5)  # let the handler run
        assert info.value.signum == signal.SIGUSR2
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN  # later ones are ignored
    finally:
        cli._Stops.signals = cli.STOP_SIGNALS
