"""Cache policies: `cache=none` (default), `adacache`, `adacache-slow`, `adacache-moreg` (issue 4);
`teacache`, `teacache-slow`, `fbcache` (content adaptive, rank-agreed), `deltadit`, `deltadit-port`,
`pab246`, `pab357`, `pab579` (schedule based, no agreement traffic) (issue 5).

    policy = attach(pipe.dit, cfg.cache, comm)   # build + install once (after the parallel layout)
    policy.reset()                               # per generation (begin_step(index 0) also resets)
    model_fn = policy.wrap_model_fn(model_fn)    # the sampler's step index reaches the policy
    ...
    report["cache"] = policy.report()
"""

from __future__ import annotations

import copy
import weakref

from runner.cache.adacache import AdaCache
from runner.cache.base import CacheAgreementError, CachePolicy, NoCache
from runner.cache.codebook import Codebook, moreg_window, select_codebook
from runner.cache.deltadit import DeltaDiT
from runner.cache.fbcache import FBCache
from runner.cache.pab import PAB
from runner.cache.teacache import TeaCache

POLICIES = {"none": NoCache, "adacache": AdaCache, "teacache": TeaCache, "fbcache": FBCache, "deltadit": DeltaDiT,
            "pab": PAB}

_installed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def build_policy(cfg, comm=None) -> CachePolicy:
    """A fresh, not yet installed policy for a CacheConfig."""
    if cfg.name not in POLICIES:
        raise ValueError(f"cache.name={cfg.name!r} is not known; use one of {', '.join(POLICIES)}")
    return NoCache() if cfg.name == "none" else POLICIES[cfg.name](cfg, comm)


def policy_of(model) -> CachePolicy | None:
    """The policy `attach` installed on model, if any."""
    entry = _installed.get(model)
    return entry[0] if entry else None


def attach(model, cfg, comm=None) -> CachePolicy:
    """The policy for cfg installed on model: reused when the same config and comm are installed,
    otherwise the old one is uninstalled and a new one installed. Call after the parallel layout."""
    entry = _installed.get(model)
    if entry is not None:
        policy, old_cfg, old_comm = entry
        if old_cfg == cfg and old_comm is comm:
            return policy
        policy.uninstall()
    policy = build_policy(cfg, comm)
    policy.install(model)
    _installed[model] = (policy, copy.deepcopy(cfg), comm)
    return policy


def detach(model) -> None:
    entry = _installed.pop(model, None)
    if entry is not None:
        entry[0].uninstall()


__all__ = ["AdaCache", "CacheAgreementError", "CachePolicy", "Codebook", "DeltaDiT", "FBCache", "NoCache", "PAB",
           "POLICIES", "TeaCache", "attach", "build_policy", "detach", "moreg_window", "policy_of", "select_codebook"]
