"""Cross-subject mutual-similarity scoring (paper Sec. 3.2, Eq. 1-2) and coarse-to-fine routing
(Sec. 3.5-3.6, Eq. 6). Pure tensor code; :class:`scripts.scoring.scorer.Scorer` (imported from there)
scores a cohort's token grids against a reference plan.
"""

from scripts.scoring.against import reference_scores, subset_scores
from scripts.scoring.blocks import DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE
from scripts.scoring.c2f import DEFAULT_ROUTES, c2f_scores
from scripts.scoring.exact import mutual_similarity_scores, num_neighbours

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "DEFAULT_QUERY_TILE",
    "DEFAULT_ROUTES",
    "c2f_scores",
    "mutual_similarity_scores",
    "num_neighbours",
    "reference_scores",
    "subset_scores",
]
