"""Scaling studies: a sweep over GPU counts, layouts and cache policies, one results table, plots,
and a cost model that knows which steps the cache skips (see runner/scaling/__main__.py)."""
