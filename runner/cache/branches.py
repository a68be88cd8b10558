"""Module-level reuse inside the blocks: the one mechanism by which a cache policy reaches into a block.

Every STDiT3 block adds three branches to its residual stream, each through a parameter-free tap
(models/layers.py `STDiT3Block.forward`):

    x = x + attn_delta(gate1 * attn(...))      slot "self"
    x = x + cross_delta(cross_attn(...))       slot "cross"
    x = x + mlp_delta(gate2 * mlp(...))        slot "mlp"

`Branches(model, keys)` stands in front of the chosen branches, keys (kind, layer, slot) with kind
"spatial" or "temporal": on the block instance the module attribute and its tap are shadowed by
callables (the modules stay in the module tree, so state-dict names do not change; `remove()`
restores the block). Before each blocks call the policy says, per key:

- `reuse`: the module is not called (a zero stands for its output, which the gate multiplies away)
  and the tap returns the kept branch output instead; a layout's hooks on the module, and so
  its collectives, do not run either;
- `keep`: the branch runs and its post-gate output is kept in `kept[key]` (PAB's broadcast source,
  AdaCache's metric residual);
- neither: the branch runs as if nothing were installed.

The assembly installs it through the policy (`CachePolicy.install`), after the parallel layout.
"""

from __future__ import annotations

SLOTS = {"self": ("attn", "attn_delta"), "cross": ("cross_attn", "cross_delta"), "mlp": ("mlp", "mlp_delta")}


class _Module:
    """Stands for block.<module>: calls it, or (reused) returns a zero the gate multiplies away."""

    def __init__(self, branches: "Branches", key, module) -> None:
        self.branches, self.key, self.module = branches, key, module

    def __call__(self, *args, **kwargs):
        if self.key in self.branches.reuse:
            return self.branches.kept[self.key].new_zeros(())
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        if name == "module":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


class _Tap:
    """Stands for block.<tap>: the post-gate branch output; kept, or (reused) replaced by the kept one."""

    def __init__(self, branches: "Branches", key, tap) -> None:
        self.branches, self.key, self.tap = branches, key, tap

    def __call__(self, x):
        b = self.branches
        if self.key in b.reuse:
            return b.kept[self.key]
        if self.key in b.keep:
            b.kept[self.key] = x.detach()
        return self.tap(x)


def block_of(model, key):
    kind, layer, _ = key
    return getattr(model, f"{kind}_blocks")[layer]


class Branches:
    def __init__(self, model, keys) -> None:
        self.keys = list(keys)
        self.reuse: set = set()
        self.keep: set = set()
        self.kept: dict = {}
        self._shadowed = []  # (block, attribute)
        for key in self.keys:
            blk = block_of(model, key)
            mod, tap = SLOTS[key[2]]
            blk.__dict__[mod] = _Module(self, key, getattr(blk, mod))
            blk.__dict__[tap] = _Tap(self, key, getattr(blk, tap))
            self._shadowed += [(blk, mod), (blk, tap)]

    def plan(self, reuse=(), keep=()) -> None:
        """What the next blocks call does; kept outputs neither reused nor kept again are dropped."""
        missing = [k for k in reuse if k not in self.kept]
        if missing:
            raise RuntimeError(f"cannot reuse branches that were never kept: {missing[:3]}")
        self.reuse, self.keep = set(reuse), set(keep)
        for key in list(self.kept):
            if key not in self.reuse and key not in self.keep:
                del self.kept[key]

    def clear(self) -> None:
        self.reuse, self.keep, self.kept = set(), set(), {}

    def remove(self) -> None:
        for blk, attr in self._shadowed:
            blk.__dict__.pop(attr, None)
        self._shadowed = []
        self.clear()
