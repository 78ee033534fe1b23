"""Network compression: Structured Bayesian Pruning (``sbp``), CPU speed measurement (``speed``).

The public names are exported from ``bdlkit/__init__.py`` (``bk.sbp`` aliases
``bdlkit.compress.sbp``); this package file is intentionally minimal so that every module in it
can be imported on its own.
"""
