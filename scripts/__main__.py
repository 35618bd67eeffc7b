"""Helper commands of the bundle (the bundle itself runs through ``python -m monai.bundle``).

Usage from the bundle root::

    python -m scripts synth --out demo_data --n_normal 20 --n_abnormal 12
    python -m scripts bench [--quick] [--device cpu|cuda] [--out bench_out] [--sections gemm,scoring]
"""

from __future__ import annotations

import fire


def synth(**kwargs):
    """Generate a synthetic registered brain-MRI cohort (see ``scripts.synthetic.brain.generate_cohort``)."""
    from scripts.synthetic.brain import cli  # imported lazily: nilearn is needed by the generator only

    return cli(**kwargs)


def bench(
    quick: bool = False,
    device: str = "cpu",
    out: str = "bench_out",
    sections: str | None = None,
    doc: str | None = "docs/performance.md",
    threads: int | None = None,
    memory_b: int | None = None,
):
    """Benchmark harness (issue 7): JSON in ``<out>/bench.json``, tables in ``docs/performance.md``.

    ``--quick``: tiny sizes (< 1 min); ``--sections gemm,scoring,baseline,c2f,tokenize,memory,e2e,profile``
    selects a subset; ``--device cuda`` runs the same harness on a GPU; ``--threads N`` sets torch's
    intra-op threads; ``--memory_b B`` the sizes (B, 2B) of the memory/end-to-end bundle runs.
    """
    from scripts.benchmarks.bench import cli  # imported lazily: only the benchmark needs it

    return cli(
        quick=quick, device=device, out=out, sections=sections, doc=doc, threads=threads, memory_b=memory_b
    )


def main() -> None:
    fire.Fire({"synth": synth, "bench": bench})


if __name__ == "__main__":
    main()
