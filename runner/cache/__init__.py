"""Cache policies, each with its typed config (registered in Hydra's `cache` group by runner/config.py):

    cache=none                                  NoCacheConfig      -> NoCache
    cache=adacache, adacache-slow, -moreg       AdaCacheConfig     -> AdaCache (whole stack, rank-agreed)
    cache=teacache, teacache-slow               TeaCacheConfig     -> TeaCache (whole stack, rank-agreed)
    cache=fbcache                               FBCacheConfig      -> FBCache (layers after 0, rank-agreed)
    cache=deltadit, deltadit-port               DeltaDiTConfig     -> DeltaDiT (a span of blocks, scheduled)
    cache=pab246, pab357, pab579                PABConfig          -> PAB (attention and MLP outputs, scheduled)

The assembly (runner/assemble.py) builds the job's policy with `cfg.cache.build(comm)` and installs
it on the parallelized model; the forward then calls `policy.blocks(e, step)` every step
(`forward` in runner/cache/base.py).
"""

from runner.cache.adacache import AdaCache, AdaCacheConfig
from runner.cache.base import CacheAgreementError, CachePolicy, NoCache, NoCacheConfig, PolicyConfig, forward
from runner.cache.codebook import Codebook, moreg_window, select_codebook
from runner.cache.deltadit import DeltaDiT, DeltaDiTConfig
from runner.cache.fbcache import FBCache, FBCacheConfig
from runner.cache.pab import PAB, PABConfig
from runner.cache.teacache import TeaCache, TeaCacheConfig

# The typed configs, one per policy, in the order of the table above.
CONFIGS = (NoCacheConfig, AdaCacheConfig, TeaCacheConfig, FBCacheConfig, DeltaDiTConfig, PABConfig)

__all__ = ["AdaCache", "AdaCacheConfig", "CONFIGS", "CacheAgreementError", "CachePolicy", "Codebook", "DeltaDiT",
           "DeltaDiTConfig", "FBCache", "FBCacheConfig", "NoCache", "NoCacheConfig", "PAB", "PABConfig",
           "PolicyConfig", "TeaCache", "TeaCacheConfig", "forward", "moreg_window", "select_codebook"]
