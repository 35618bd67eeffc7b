"""Benchmarks of the bundle (never imported by its runtime): ``python -m scripts.benchmarks --help``.

Commands: ``quality`` (:mod:`.quality`, cohorts in :mod:`.cohorts`), ``performance``
(:mod:`.performance`, rendered by :mod:`.performance_report`), ``scaling`` (:mod:`.scaling`) and ``gpu``
(:mod:`.gpu`); :mod:`.common` and :mod:`.tables` are shared helpers.
"""
