"""The production launch path: real torchrun, init_mesh from its environment, one uneven all_to_all."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from parallel.comm import Comm, split_range, split_sizes
    from parallel.mesh import ParallelConfig, init_mesh

    mesh = init_mesh(ParallelConfig(sp=-1, timeout_s=60))
    comm = Comm(mesh)
    comm.log.set_step(0)
    full = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5)  # 3 rows, 5 columns
    a, b = split_range(5, mesh.sp, mesh.sp_rank)
    y = comm.all_to_all(full[:, a:b], "sp", scatter_dim=0, gather_dim=1,
                        gather_sizes=split_sizes(5, mesh.sp))
    r0, r1 = split_range(3, mesh.sp, mesh.sp_rank)
    assert torch.equal(y, full[r0:r1]), y
    out = {"rank": mesh.rank, "world": mesh.world_size, "backend": mesh.backend,
           "steps": comm.log.per_step()}
    with open(os.path.join(sys.argv[1], f"rank{mesh.rank}.json"), "w") as f:
        json.dump(out, f)
    mesh.destroy()
""")


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, repo_root):
    script = tmp_path / "smoke.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": repo_root, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (out["rank"], out["world"], out["backend"]) == (rank, 2, "gloo")
        assert out["steps"]["0"]["all_to_all"]["count"] == 1
