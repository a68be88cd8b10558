"""SkipSync's runner: the launcher, generation, parallel jobs and caching around models/.

Importing it sets OMP_WAIT_POLICY=PASSIVE unless the environment names a policy. It has to be set
before torch loads libgomp, and every entry point imports this package first; torchrun's ranks
inherit it. libgomp's own default spins waiting threads, which on a shared CPU spin against the
other work. Measured on a 2-core machine (bench/default_walltime.py, median sampling seconds of
the default generation, libgomp's default / PASSIVE): 7.3 / 4.3 beside one busy process, 89.9 / 3.6
beside two, and 2.4 / 3.8 on an idle machine. OMP_WAIT_POLICY='' restores libgomp's default.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
