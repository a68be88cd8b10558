"""`python -m runner.generate` with a fault injected on one rank, for the torchrun fault tests.

    torchrun ... tests/fault_job.py PIDDIR MODE FAULT_RANK [hydra overrides...]

MODE: none | raise | kill | hang | bad_input, applied to FAULT_RANK at its first model call
(bad_input: its output directory check fails). FAULT_RANK is a global rank, or "here" (every rank
of this launcher) or "none" (no rank of it), for multi-launcher tests where ranks are assigned by
the rendezvous. "+hang" after a mode (raise+hang) makes every other
rank hang at its first model call instead, so only the failure propagation can end it. Every rank
writes its pid to PIDDIR/rank<N>.pid so a test can check that none survives.
"""

import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import runner.generate as g  # noqa: E402


def main() -> None:
    piddir, mode, fault_rank = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = int(os.environ.get("RANK", "0"))
    faulty = fault_rank == "here" or (fault_rank not in ("here", "none") and rank == int(fault_rank))
    with open(os.path.join(piddir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    mode, _, others = mode.partition("+")
    action = mode if faulty else others

    if action == "bad_input":
        def check_output_dir(path):
            raise g.UserError(f"cannot write to output_dir={path!r} (simulated on rank {rank})")
        g.check_output_dir = check_output_dir
    elif action in ("raise", "kill", "hang"):
        real_sample = g.sample

        def sample(model_fn, *args, **kwargs):
            def faulty(z, t, info):
                if action == "raise":
                    raise RuntimeError(f"injected fault on rank {rank}")
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # hang
            return real_sample(faulty, *args, **kwargs)

        g.sample = sample
    # runner.generate's Hydra entry point with its config directory given absolutely (run as a
    # script, Hydra would look for the config next to this file's module otherwise).
    import hydra

    sys.argv = ["runner.generate", *sys.argv[4:]]
    hydra.main(version_base=None, config_path=os.path.join(ROOT, "conf"), config_name="config")(
        g._hydra_main.__wrapped__)()


if __name__ == "__main__":
    main()
