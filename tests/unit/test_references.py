"""Reference sets: chunks (paper Sec. 5.1, Table 8), random reference subsets, the `references` key."""

from __future__ import annotations

import math
import random

import pytest
import torch
from scripts.errors import CS3FInputError
from scripts.inferer import CS3FInferer
from scripts.scoring import mutual_similarity_scores, subset_scores
from scripts.scoring.references import ReferenceSet, chunk_ranges, reference_subsets
from scripts.tokens import TokenGrid, VolumeTokens
from tests.helpers import float32_distance_tolerance, float64_brute_force

NAMES = [f"sub-{i:04d}" for i in range(1, 12)]


def random_volumes(b: int, fine: bool = False, seed: int = 0) -> list[VolumeTokens]:
    """Token grids as the inferer makes them (two keys, some invalid tokens, d = 8; with ``fine``,
    ``/fine`` grids of h = 2 children per coarse token), from random numbers: no encoder needed."""
    gen = torch.Generator().manual_seed(seed)
    volumes = []
    for _ in range(b):
        grids = {}
        for key, shape in (("axial/0", (2, 4, 4)), ("coronal/1", (2, 2, 2))):
            grids[key] = TokenGrid(torch.randn(*shape, 8, generator=gen), torch.rand(shape, generator=gen) > 0.2)
            if fine:
                fine_shape = (2 * shape[0], *shape[1:])
                grids[key + "/fine"] = TokenGrid(
                    torch.randn(*fine_shape, 8, generator=gen), torch.rand(fine_shape, generator=gen) > 0.2
                )
        for grid in grids.values():
            grid.valid.view(-1)[0] = True
        volumes.append(VolumeTokens((8, 8, 8), grids))
    return volumes


@pytest.fixture(scope="module")
def tokens() -> list:
    return random_volumes(11)


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


# ----------------------------------------------------------------------------------- chunks
def test_chunk_ranges() -> None:
    assert chunk_ranges(180, 45) == [(0, 45), (45, 90), (90, 135), (135, 180)]  # Table 8: 4 x 45
    assert chunk_ranges(70, 16) == [(0, 18), (18, 36), (36, 53), (53, 70)]  # >= chunk_size each
    assert chunk_ranges(10, 16) == [(0, 10)]
    assert chunk_ranges(3, 2) == [(0, 3)]  # never a lone volume
    for b in range(2, 40):
        for size in range(2, 12):
            ranges = chunk_ranges(b, size)
            assert ranges[0][0] == 0 and ranges[-1][1] == b
            assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:], strict=False))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1 and (min(sizes) >= size or len(ranges) == 1)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_ranges(10, 1)


@pytest.mark.parametrize("variant", ["C", "MS"])
def test_chunked_scores_equal_each_chunk_scored_separately(variant: str) -> None:
    kw = {"q_fine": 2} if variant == "MS" else {}
    exact = CS3FInferer(q=4, d=8, rho=0.5, variant=variant, L=2, **kw)
    bank = random_volumes(7, fine=variant == "MS")
    chunked = CS3FInferer(q=4, d=8, rho=0.5, variant=variant, L=2, references="chunks:3", **kw)
    assert chunk_ranges(7, 3) == [(0, 4), (4, 7)]
    expected = exact.score(bank[:4]) + exact.score(bank[4:])
    assert _equal(chunked.score(bank), expected)
    # a share of the queries (what a torchrun rank asks for) gives the same rows
    share = chunked.score(bank, queries=[1, 5])
    assert _equal([share[1], share[5]], [expected[1], expected[5]]) and share[0] == {}


def test_chunked_scores_use_the_exact_scorer_within_each_chunk(tokens: list) -> None:
    """Per key, chunk scores equal mutual_similarity_scores on that chunk's tokens (K from the chunk)."""
    inferer = CS3FInferer(q=4, d=8, rho=0.3, references="chunks:5")
    scores = inferer.score(tokens)
    for lo, hi in chunk_ranges(len(tokens), 5):  # (0, 5), (5, 11): K = 1 and 3
        for key in tokens[0].grids:
            t = torch.stack([v.grids[key].tokens.reshape(-1, 8) for v in tokens[lo:hi]])
            v = torch.stack([vol.grids[key].valid.reshape(-1) for vol in tokens[lo:hi]])
            expected = mutual_similarity_scores(t, v, rho=0.3)
            got = torch.stack([scores[i][key].reshape(-1) for i in range(lo, hi)])
            assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------- reference subsets
def test_reference_subsets_are_seeded_order_independent_and_sized() -> None:
    subsets = reference_subsets(NAMES, 4, seed=0)
    assert all(len(s) == 4 and i not in s for i, s in subsets.items())
    assert subsets == reference_subsets(NAMES, 4, seed=0)
    assert subsets != reference_subsets(NAMES, 4, seed=1)
    shuffled = NAMES[:]
    random.Random(3).shuffle(shuffled)
    other = reference_subsets(shuffled, 4, seed=0)
    for i, name in enumerate(NAMES):
        mine = [NAMES[j] for j in subsets[i]]
        assert mine == [shuffled[j] for j in other[shuffled.index(name)]] and mine == sorted(mine)
    assert reference_subsets(NAMES, 50)[0] == list(range(1, 11))  # n >= B - 1: all the others
    # every volume is picked about equally often (a uniform draw): 11 * 4 picks over 11 volumes
    picks = [j for s in reference_subsets([f"v{i}" for i in range(200)], 20).values() for j in s]
    counts = torch.bincount(torch.tensor(picks), minlength=200).float()
    assert counts.mean() == 20 and counts.std() < 8  # binomial-like, std ~ 4.3


def test_n_references_scores_equal_exact_scorer_on_query_and_its_subset(tokens: list) -> None:
    rho = 0.5
    inferer = CS3FInferer(q=4, d=8, rho=rho, references="random:4")
    scores = inferer.score(tokens, names=NAMES)
    subsets = reference_subsets(NAMES, 4, seed=0)
    exact = CS3FInferer(q=4, d=8, rho=rho)
    for i in (0, 6, 10):
        assert _equal([scores[i]], [exact.score([tokens[i], *(tokens[j] for j in subsets[i])], [0])[0]])
    # K = max(1, floor(rho * n_references)) against those references, written out for one token
    key = "coronal/1"
    q = tokens[0].grids[key].tokens.reshape(-1, 8)[5].double()
    nearest = sorted(
        float((tokens[j].grids[key].tokens.reshape(-1, 8).double() - q).norm(dim=1).min()) for j in subsets[0]
    )
    k = math.floor(rho * 4)
    assert abs(float(scores[0][key].reshape(-1)[5]) - sum(nearest[:k]) / k) < 1e-5


def test_n_references_is_deterministic_and_order_independent(tokens: list) -> None:
    inferer = CS3FInferer(q=4, d=8, rho=0.5, references="random:3", seed=7)
    first = inferer.score(tokens, names=NAMES)
    assert _equal(inferer.score(tokens, names=NAMES), first)
    order = list(range(11))
    random.Random(0).shuffle(order)
    permuted = inferer.score([tokens[i] for i in order], names=[NAMES[i] for i in order])
    assert _equal([permuted[order.index(i)] for i in range(11)], first)


@pytest.mark.parametrize("n", [10, 11, 100])
def test_n_references_at_least_b_minus_1_is_the_exact_scorer(tokens: list, n: int) -> None:
    exact = CS3FInferer(q=4, d=8, rho=0.3).score(tokens)
    assert _equal(CS3FInferer(q=4, d=8, rho=0.3, references=f"random:{n}").score(tokens, names=NAMES), exact)


def test_all_others_as_a_subset_equals_the_exact_scorer(tokens: list) -> None:
    """The subset scorer itself (the n_references path, which the inferer skips for n >= B - 1) with
    every other volume as the subset: brute-force Eq. 1-2 and the exact scorer's rows."""
    from tests.unit.test_scoring import brute_force_scores

    rho, queries = 0.3, (0, 5, 10)
    for key in tokens[0].grids:
        t = torch.stack([v.grids[key].tokens.reshape(-1, 8) for v in tokens])
        valid = torch.stack([v.grids[key].valid.reshape(-1) for v in tokens])
        subsets = {i: [j for j in range(11) if j != i] for i in queries}
        got = subset_scores(t, valid, subsets, rho=rho, query_tile=4, block_elements=64)
        exact = mutual_similarity_scores(t, valid, rho=rho)
        expected = brute_force_scores(t, valid, rho)
        for i in range(11):
            if i in subsets:
                assert got[i].abs().sum() > 0
                torch.testing.assert_close(got[i].double(), expected[i], atol=1e-4, rtol=0)
                torch.testing.assert_close(got[i], exact[i], atol=1e-5, rtol=1e-5)
            else:
                assert torch.all(got[i] == 0)  # not a query: not scored


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ReferenceSet()),
        ("all", ReferenceSet()),
        ("chunks:16", ReferenceSet("chunks", 16)),
        ("random:32", ReferenceSet("random", 32)),
        ("bank:/data/bank", ReferenceSet("bank", None, "/data/bank")),
        ({"mode": "random", "size": 4}, ReferenceSet("random", 4)),
    ],
)
def test_reference_set_spellings(value: object, expected: ReferenceSet) -> None:
    parsed = ReferenceSet.parse(value)
    assert parsed == expected
    assert ReferenceSet.parse(str(parsed)) == parsed  # what run.json records parses back


@pytest.mark.parametrize(
    "value", ["chunks:1", "chunks", "random:0", "random:x", "random:2.5", "bank:", "some", "all:3", 7]
)
def test_bad_reference_sets_are_one_line_errors(value: object) -> None:
    with pytest.raises(CS3FInputError, match="references") as err:
        CS3FInferer(references=value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spelling", ["chunks:8", "random:8"])
def test_reference_sets_are_recorded(spelling: str) -> None:
    assert CS3FInferer(references=spelling).describe()["references"] == spelling
    assert "references" not in CS3FInferer().describe()  # the paper's setting is the default


# ----------------------------------------------------------------------------------- every mode
def _stacked(volumes: list[VolumeTokens], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([v.grids[key].tokens.reshape(-1, 8) for v in volumes]), torch.stack(
        [v.grids[key].valid.reshape(-1) for v in volumes]
    )


def _expected_against(query: VolumeTokens, refs: list[VolumeTokens], key: str, rho: float) -> torch.Tensor:
    """float64 Eq. 1-2 of ``query`` against exactly ``refs`` (row 0 of the batch ``[query, *refs]``)."""
    tokens, valid = _stacked([query, *refs], key)
    return float64_brute_force(tokens, valid, rho)[0]


@pytest.mark.parametrize("mode", ["all", "chunks:4", "random:3", "bank", "bank-exclude", "subsets"])
def test_every_reference_mode_equals_the_float64_brute_force_on_its_reference_set(mode: str) -> None:
    """Each reference set scores every query as Eq. 1-2 against exactly the references it names."""
    rho, b = 0.5, 9
    volumes, names = random_volumes(b, seed=5), NAMES[:b]
    if mode.startswith("bank"):
        cohort, bank = volumes[:3], volumes[3:]
        reference_bank = {key: _stacked(bank, key) for key in volumes[0].grids}
        exclude = [None, 2, [0, 4]] if mode == "bank-exclude" else None
        got = CS3FInferer(q=4, d=8, rho=rho).score(cohort, reference_bank=reference_bank, exclude=exclude)
        skips = [set(), {2}, {0, 4}] if exclude else [set()] * 3
        refs_of = {i: [bank[j] for j in range(len(bank)) if j not in skips[i]] for i in range(3)}
    elif mode == "subsets":
        subsets = {0: [3, 5], 4: [1, 2, 6, 8], 7: [0]}
        got = [{} for _ in volumes]
        for key in volumes[0].grids:
            scores = subset_scores(*_stacked(volumes, key), subsets, rho=rho, query_tile=4, block_elements=64)
            for i in subsets:
                got[i][key] = scores[i]
        cohort, refs_of = volumes, {i: [volumes[j] for j in refs] for i, refs in subsets.items()}
    else:
        got = CS3FInferer(q=4, d=8, rho=rho, references=mode).score(volumes, names=names)
        if mode == "all":
            members = {i: range(b) for i in range(b)}
        elif mode.startswith("chunks"):
            members = {i: range(lo, hi) for lo, hi in chunk_ranges(b, 4) for i in range(lo, hi)}
        else:
            members = {i: [i, *refs] for i, refs in reference_subsets(names, 3).items()}
        cohort = volumes
        refs_of = {i: [volumes[j] for j in members[i] if j != i] for i in range(b)}
    for i, refs in refs_of.items():
        for key in volumes[0].grids:
            expected = _expected_against(cohort[i], refs, key, rho)
            tolerance = float32_distance_tolerance(_stacked([cohort[i], *refs], key)[0])
            torch.testing.assert_close(got[i][key].reshape(-1).double(), expected, atol=tolerance, rtol=0)
