"""Cross-subject mutual-similarity scoring (paper Sec. 3.2, Eq. 1-2) and coarse-to-fine routing
(Sec. 3.5-3.6, Eq. 6). Pure tensor code: no files, no encoders.

* :mod:`scripts.scoring.blocks` - fp32 distance blocks and nearest-distance profiles (Eq. 1).
* :mod:`scripts.scoring.exact` - Eq. 2's mean of the ``K`` nearest (the one implementation every mode
  reuses) and the exact scores of a batch, :func:`mutual_similarity_scores`.
* :mod:`scripts.scoring.against` - query volumes against given references: subsets of the cohort
  (:func:`subset_scores`) or a reference bank (:func:`reference_scores`).
* :mod:`scripts.scoring.c2f` - coarse scores and coarse-to-fine routed fine scores, :func:`c2f_scores`.
* :mod:`scripts.scoring.references` - which volumes each query is scored against, as data.
* :mod:`scripts.scoring.scorer` - :class:`~scripts.scoring.scorer.Scorer`, the one entry point that
  scores a cohort's token grids against a reference plan (imported from there: it sits one layer up,
  on :mod:`scripts.tokens`).
"""

from scripts.scoring.against import reference_scores, subset_scores
from scripts.scoring.blocks import DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE, nearest_distance_profile
from scripts.scoring.c2f import DEFAULT_ROUTES, c2f_scores, c2f_tiles
from scripts.scoring.exact import mutual_similarity_scores, num_neighbours

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "DEFAULT_QUERY_TILE",
    "DEFAULT_ROUTES",
    "c2f_scores",
    "c2f_tiles",
    "mutual_similarity_scores",
    "nearest_distance_profile",
    "num_neighbours",
    "reference_scores",
    "subset_scores",
]
