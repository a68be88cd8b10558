"""Start real torchrun jobs from tests: one standalone launcher, or several "nodes" on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    e.update(PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standalone(nproc: int, target: list[str]) -> list[str]:
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *target]


def node(nnodes: int, port: int, target: list[str], is_host: bool | None = None) -> list[str]:
    """One launcher of an nnodes x 1 job meeting at a c10d rendezvous on 127.0.0.1:port. On one
    machine every launcher may host the rendezvous store (the first to bind wins); is_host pins it."""
    host = [] if is_host is None else [f"--rdzv_conf=is_host={int(is_host)}"]
    return [*TORCHRUN, f"--nnodes={nnodes}", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=skipsync-test-{port}", *host, *target]


def run_all(cmds: list[list[str]], timeout: float) -> tuple[list[int], str, float]:
    """Start every command at once; -> (return codes, combined output, seconds until all ended).
    Past `timeout` everything is killed and the codes are None."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]
    outs, codes = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, 9)
                except ProcessLookupError:
                    pass
            out, _ = p.communicate()
            codes.append(None)
        outs.append(out)
    return codes, "\n".join(outs), time.monotonic() - t0


def alive(pid: int) -> bool:
    """A running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def survivors(piddir, wait_s: float = 5.0) -> list[int]:
    pids = [int(open(os.path.join(piddir, f)).read()) for f in os.listdir(piddir) if f.endswith(".pid")]
    deadline = time.monotonic() + wait_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]
