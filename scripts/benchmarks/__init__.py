"""Benchmarks of the bundle (never imported by its runtime): ``python -m scripts.benchmarks --help``.

Modules: ``harness`` runs the sections of ``run`` and ``report`` renders them; each section module
holds its measurement and its markdown (``gemm``, ``scoring_bench``, ``c2f_section``,
``tokenize_bench``, ``memory``, ``profile_bench``, with ``prototypes`` and ``unfused``); ``timing``,
``values``, ``markdown`` and ``settings`` are shared helpers; ``c2f`` and ``scaling`` are the
standalone ``c2f`` and ``scaling`` commands.
"""
