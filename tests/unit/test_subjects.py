"""Scans of one subject are never references for each other (``groups``), in every exact scorer."""

from __future__ import annotations

import math

import pytest
import torch
from scripts.scoring import c2f_scores, mutual_similarity_scores, reference_scores


def _tokens(b: int = 7, n: int = 40, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    valid = torch.rand(b, n, generator=gen) > 0.3
    return tokens, valid


def _brute_force(tokens: torch.Tensor, valid: torch.Tensor, rho: float, groups: list) -> torch.Tensor:
    """Eq. 1-2 by hand over the volumes of *other* subjects, K from their count."""
    b, n, _ = tokens.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    t = tokens.double()
    for i in range(b):
        refs = [j for j in range(b) if groups[j] != groups[i]]
        k = max(1, math.floor(rho * len(refs) + 1e-9))
        for a in range(n):
            if not valid[i, a]:
                continue
            nearest = sorted(float((t[j][valid[j]] - t[i, a]).norm(dim=1).min()) for j in refs)
            out[i, a] = sum(nearest[:k]) / k
    return out


GROUPS = [0, 1, 1, 2, 3, 3, 3]


@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0])
def test_groups_equal_brute_force_in_both_orders(rho: float) -> None:
    tokens, valid = _tokens()
    expected = _brute_force(tokens, valid, rho, GROUPS)
    whole = mutual_similarity_scores(tokens, valid, rho, groups=GROUPS)  # pair-symmetric order
    torch.testing.assert_close(whole.double(), expected, atol=1e-5, rtol=1e-5)
    for i in range(7):  # per-volume order, as one torchrun rank's share
        one = mutual_similarity_scores(tokens, valid, rho, groups=GROUPS, volumes=[i])
        torch.testing.assert_close(one[i], whole[i], atol=1e-6, rtol=1e-6)


def test_a_copy_in_the_same_subject_does_not_hide_a_lesion() -> None:
    """Volume 1 is an exact copy of volume 0: as one subject they score as if the copy were absent."""
    tokens, valid = _tokens(8)
    tokens[1], valid[1] = tokens[0], valid[0]
    alone = mutual_similarity_scores(tokens[1:], valid[1:], 0.3)[0]
    grouped = mutual_similarity_scores(tokens, valid, 0.3, groups=[0, 0, 1, 2, 3, 4, 5, 6])
    torch.testing.assert_close(grouped[0], alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grouped[1], alone, atol=1e-6, rtol=1e-6)
    assert float(mutual_similarity_scores(tokens, valid, 0.1)[0].max()) == 0.0  # the failure it fixes


def test_no_groups_is_the_paper() -> None:
    tokens, valid = _tokens()
    plain = mutual_similarity_scores(tokens, valid, 0.3)
    assert torch.equal(mutual_similarity_scores(tokens, valid, 0.3, groups=list(range(7))), plain)


def test_c2f_with_groups_at_full_routing_is_exact_on_fine_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    b, n_c, h, d = 6, 12, 2, 8
    fine = torch.nn.functional.normalize(torch.randn(b, n_c, h, d, generator=gen), dim=-1)
    coarse = torch.nn.functional.normalize(fine.mean(dim=2), dim=-1)
    groups = [0, 0, 1, 2, 2, 3]
    c, f = c2f_scores(coarse, fine, rho=0.5, L=n_c, groups=groups)
    ones = torch.ones(b, n_c, dtype=torch.bool)
    torch.testing.assert_close(c.double(), _brute_force(coarse, ones, 0.5, groups), atol=1e-5, rtol=1e-5)
    expected = _brute_force(fine.reshape(b, n_c * h, d), torch.ones(b, n_c * h, dtype=torch.bool), 0.5, groups)
    torch.testing.assert_close(f.reshape(b, -1).double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_bank_excludes_every_scan_of_the_subject() -> None:
    tokens, valid = _tokens(7)
    bank, bank_valid = tokens[1:], valid[1:]
    got = reference_scores(tokens[:1], valid[:1], bank, bank_valid, 0.5, exclude=[[0, 1]])
    expected = reference_scores(tokens[:1], valid[:1], bank[2:], bank_valid[2:], 0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_a_subject_holding_the_whole_batch_is_an_error() -> None:
    tokens, valid = _tokens(3)
    with pytest.raises(ValueError, match="no reference"):
        mutual_similarity_scores(tokens, valid, 0.5, groups=["a", "a", "a"])


def _volumes(b: int = 8) -> list:
    """Random token grids of ``b`` volumes; volume 1 is an exact copy of volume 0."""
    from scripts.tokens import TokenGrid, VolumeTokens

    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(b):
        grids = {
            key: TokenGrid(
                torch.nn.functional.normalize(torch.randn(2, 3, 3, 8, generator=gen), dim=-1),
                torch.rand(2, 3, 3, generator=gen) > 0.2,
            )
            for key in ("axial/0", "coronal/0")
        }
        out.append(VolumeTokens((8, 8, 8), grids))
    out[1] = VolumeTokens((8, 8, 8), {k: TokenGrid(g.tokens.clone(), g.valid.clone()) for k, g in out[0].grids.items()})
    return out


@pytest.mark.parametrize("references", ["all", "random:4", "random:100", "chunks:8"])
def test_every_reference_mode_keeps_a_subjects_scans_apart(references: str) -> None:
    """With the copy declared the same subject, volume 0 scores as if the copy were not in the cohort."""
    from scripts.inferer import CS3FInferer

    bank = _volumes()
    names = [f"v{i}" for i in range(8)]
    inferer = CS3FInferer(q=4, d=8, rho=0.5, references=references)
    grouped = inferer.score(bank, names=names, subjects=["s0", "s0", *names[2:]])
    for i in (0, 1):  # each scan as if its mate were not in the cohort (random draws are by name)
        without = inferer.score([bank[i], *bank[2:]], names=[names[i], *names[2:]])[0]
        for key in bank[0].grids:
            torch.testing.assert_close(grouped[i][key], without[key], atol=1e-6, rtol=1e-6)
            assert float(grouped[i][key].max()) > 0


def test_reference_bank_mode_excludes_the_subjects_scans() -> None:
    from scripts.inferer import CS3FInferer

    bank = _volumes()
    refs = {
        k: (
            torch.stack([v.grids[k].tokens for v in bank]).flatten(1, 3),
            torch.stack([v.grids[k].valid for v in bank]).flatten(1),
        )
        for k in bank[0].grids
    }
    inferer = CS3FInferer(q=4, d=8, rho=0.5)
    got = inferer.score(bank[:1], reference_bank=refs, exclude=[[0, 1]])[0]
    rest = {k: (t[2:], v[2:]) for k, (t, v) in refs.items()}
    expected = inferer.score(bank[:1], reference_bank=rest)[0]
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)


def test_subject_of_column_pattern_and_name() -> None:
    from scripts.engine.subjects import subject_of
    from scripts.errors import CS3FInputError

    assert subject_of("a-001", {"subject": "s1"}) == "s1"
    assert subject_of("BraTS-MET-00012-000", None, r"^(BraTS-MET-\d+)") == "BraTS-MET-00012"
    assert subject_of("sub-01_ses-2_T1w", None, r"sub-\d+") == "sub-01"
    assert subject_of("a-001", {"subject": ""}) == "a-001"
    with pytest.raises(CS3FInputError, match="does not match"):
        subject_of("x", None, r"^sub-\d+")
    with pytest.raises(CS3FInputError, match="not a regular expression"):
        subject_of("x", None, "(")


def test_identical_volumes_join_one_subject_whatever_the_order() -> None:
    from scripts.engine.subjects import join_identical

    names = ["a", "b", "c", "d", "e"]
    subjects = ["a", "b", "c", "c", "e"]  # c and d: one subject by column
    digests = ["x", "y", "x", "z", "w"]  # a is a copy of c
    with pytest.warns(UserWarning, match=r"identical volumes \['a', 'c'\]"):
        joined = join_identical(names, subjects, digests)
    assert joined == ["a", "b", "a", "a", "e"]
    order = [4, 3, 2, 1, 0]
    with pytest.warns(UserWarning):
        reordered = join_identical([names[i] for i in order], [subjects[i] for i in order], [digests[i] for i in order])
    assert reordered == [joined[i] for i in order]


@pytest.mark.parametrize("references", ["all", "random:3", "chunks:3", "chunks:4"])
@pytest.mark.parametrize(
    "subjects", [list("abcdefg"), list("aaaaaaa"), list("aaabcdd"), list("aaaabbb"), list("abbbbcc"), list("aabbbbb")]
)
def test_volumes_without_references_are_those_the_plan_leaves_alone(subjects: list[str], references: str) -> None:
    """Brute force over the plan's reference sets: a volume has none when every other candidate shares
    its subject."""
    from scripts.engine.subjects import without_references
    from scripts.scoring.references import ReferenceSet, plan_references

    refs = ReferenceSet.parse(references)
    b = len(subjects)
    plan = plan_references(ReferenceSet("chunks", refs.size) if refs.mode == "chunks" else ReferenceSet(), b)
    candidates = {i: [j for batch in plan.batches if i in batch for j in batch if j != i] for i in range(b)}
    expected = [i for i in range(b) if all(subjects[j] == subjects[i] for j in candidates[i])]
    assert without_references(subjects, refs) == expected
