"""Reference-bank mode: build a cohort's token bank once, score new volumes against it,
memory-mapped fp16 banks streamed by the scorer."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts.inferer import CS3FInferer
from scripts.scoring import mutual_similarity_scores, reference_scores
from scripts.storage.bank import TokenBank
from scripts.tokens import TokenGrid, VolumeTokens
from tests.helpers import ROOT, run_workflow
from tests.unit.test_references import random_volumes

CONFIGS = ["configs/inference.json"]
BUILD = [*CONFIGS, "configs/build_bank.json"]


def _workflow(config_file: list[str], **overrides):  # noqa: ANN202 - the run's CS3FEvaluator
    # CS3F-C, unsmoothed: what the brute-force references below compute
    return run_workflow(config_file, **{"dataloader#num_workers": 0, "variant": "C", "smooth_mm": 0.0, **overrides})


def _mapping_of(tensor: torch.Tensor, path: Path) -> str | None:
    """The permissions (e.g. ``r--s``) of this process's mapping of the file ``path`` that holds
    ``tensor``'s data, from /proc/self/maps; ``None`` if its data is not in a mapping of that file."""
    target, ptr = os.path.realpath(path), tensor.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return fields[1]
    return None


def brute_force_against(queries, query_valid, refs, ref_valid, rho: float) -> torch.Tensor:
    """Eq. 1-2 against a reference set, written out in float64 (no GEMM form, no tiling)."""
    b_ref = refs.shape[0]
    k = max(1, math.floor(rho * b_ref + 1e-9))
    q, r = queries.double(), refs.double()
    out = torch.zeros(q.shape[:2], dtype=torch.float64)
    for i in range(q.shape[0]):
        nearest = torch.stack(
            [
                (q[i][:, None, :] - r[j][ref_valid[j]][None, :, :]).pow(2).sum(-1).sqrt().min(dim=1).values
                for j in range(b_ref)
            ],
            dim=1,
        )  # [N, B_ref]
        scores = nearest.sort(dim=1).values[:, :k].mean(dim=1)
        out[i] = torch.where(query_valid[i], scores, 0.0)
    return out


# ----------------------------------------------------------------------------------- scorer level
def test_reference_scores_match_brute_force_and_fp16_bank() -> None:
    gen = torch.Generator().manual_seed(0)
    queries, refs = torch.randn(3, 20, 6, generator=gen), torch.randn(7, 25, 6, generator=gen).half()
    qv, rv = torch.rand(3, 20, generator=gen) > 0.3, torch.rand(7, 25, generator=gen) > 0.3
    for rho in (0.1, 0.5, 1.0):
        got = reference_scores(queries, qv, refs, rv, rho, query_tile=4, block_elements=50)
        torch.testing.assert_close(got.double(), brute_force_against(queries, qv, refs, rv, rho), atol=1e-5, rtol=0)


def test_reference_scores_of_the_bank_itself_equal_the_exact_scorer() -> None:
    """A query that is in the bank is never its own reference: K = floor(rho (B - 1)), as in the run."""
    tokens = torch.randn(6, 30, 8, generator=torch.Generator().manual_seed(1))
    for rho in (0.1, 0.5):
        ref = reference_scores(tokens, None, tokens, None, rho, exclude=list(range(6)))
        assert torch.equal(ref, mutual_similarity_scores(tokens, rho=rho))
    with pytest.raises(ValueError, match="no reference"):
        reference_scores(tokens[:1], None, tokens[:1], None, exclude=[0])


@pytest.mark.parametrize("variant", ["C", "MS"])
def test_inferer_score_against_a_bank_equals_exact_scorer_on_query_plus_bank(variant: str) -> None:
    kw = {"q_fine": 2} if variant == "MS" else {}
    inferer = CS3FInferer(q=4, d=8, rho=0.5, variant=variant, L=2, **kw)
    tokens = random_volumes(7, fine=variant == "MS")
    for vt in tokens:  # an fp16 bank: the new volumes in fp16 too, so that both sides agree exactly
        for grid in vt.grids.values():
            grid.tokens = grid.tokens.half()
    bank, new = tokens[:5], tokens[5:]
    refs = {
        k: (
            torch.stack([v.grids[k].tokens.reshape(-1, 8) for v in bank]),
            torch.stack([v.grids[k].valid.reshape(-1) for v in bank]),
        )
        for k in bank[0].grids
    }
    got = inferer.score(new, reference_bank=refs)
    for i, vt in enumerate(new):  # the query with the bank as the other volumes of a batch
        expected = inferer.score([vt, *bank], queries=[0])[0]
        assert set(got[i]) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[i][key], expected[key], atol=1e-5, rtol=1e-5)
    # bank volumes scored against their own bank (themselves excluded) = the exact run of the bank
    own = inferer.score(bank, reference_bank=refs, exclude=list(range(5)))
    exact = inferer.score(bank)
    for i in range(5):
        for key in exact[i]:
            torch.testing.assert_close(own[i][key], exact[i][key], atol=1e-5, rtol=1e-5)


_MEMMAP_SCRIPT = """
    import json, sys, threading, time
    import torch
    sys.path.insert(0, {root!r})
    from scripts.scoring import reference_scores
    from scripts.storage.bank import TokenBank
    torch.set_num_threads(1)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def anon():
        return status("RssAnon")

    d = int(sys.argv[2])
    queries = torch.randn(1, 48, d, generator=torch.Generator().manual_seed(0))
    # warm-up on a small bank in memory: kernels loaded before the baseline
    small = torch.randn(2, 64, d).half()
    reference_scores(queries[:, :4], None, small, torch.ones(2, 64, dtype=torch.bool))
    peak, done = [anon()], []

    def sample():
        while not done:
            peak.append(anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    # VmHWM is this process's peak RSS (ru_maxrss would also carry the parent's peak across exec)
    base_anon, base_rss = anon(), status("VmHWM")
    sampler.start()
    refs, valid = TokenBank(sys.argv[1]).references("")["axial/0"]  # opened after the baseline
    scores = reference_scores(queries, None, refs, valid, rho=0.1, block_elements=1 << 20)
    done.append(1)
    sampler.join()
    rss = status("VmHWM") - base_rss
    b = refs.shape[0]
    # brute force for a few queries, reading the bank volume by volume
    q = queries[0, :3].double()
    nearest = torch.stack([torch.cdist(q, refs[j].double()).min(dim=1).values for j in range(b)], dim=1)
    k = max(1, int(0.1 * b))
    expected = nearest.sort(dim=1).values[:, :k].mean(dim=1)
    error = float((scores[0, :3].double() - expected).abs().max())
    print(json.dumps({{"anon": max(peak) - base_anon, "rss": rss, "error": error, "b": b}}))
    """
_MEMMAP_SCRIPT = textwrap.dedent(_MEMMAP_SCRIPT)


def test_memory_mapped_fp16_bank_is_streamed(tmp_path: Path) -> None:
    """Scoring against a bank opened by TokenBank never copies it (let alone in fp32): the extra
    anonymous memory stays far below the bank's fp32 size, and the peak RSS grows by at most the
    fp16 pages read from the file (clean file pages the kernel may drop under memory pressure, which
    is what lets a bank larger than RAM work)."""
    from scripts.storage.bank import BankWriter

    b, grid, d = 4096, (4, 8, 8), 64  # N = 256 tokens: fp16 128 MiB on disk, fp32 256 MiB
    writer = BankWriter(tmp_path / "bank", capacity=b)
    rng = np.random.default_rng(0)
    valid = torch.ones(grid, dtype=torch.bool)
    for i in range(b):
        tokens = torch.from_numpy(rng.standard_normal((*grid, d), dtype=np.float32))
        writer.add(f"v{i:04d}", "", VolumeTokens((32, 32, 32), {"axial/0": TokenGrid(tokens, valid)}))
    writer.finish({"d": d})
    del writer
    n = math.prod(grid)
    fp32, fp16 = b * n * d * 4, b * n * d * 2
    # A fixed mmap threshold: glibc's dynamic one moves freed MiB-sized blocks to the heap, where they
    # may stay resident (20 MiB more, or not, from run to run): measure live memory, not that.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(
        [sys.executable, "-c", _MEMMAP_SCRIPT.format(root=str(ROOT)), str(tmp_path / "bank"), str(d)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["b"] == b and result["error"] < 1e-4, result
    assert result["anon"] < fp32 / 6, result  # 4 MiB blocks, norms, buffer, profile: ~23 MiB measured
    assert result["rss"] < fp16 + fp32 / 6, result  # an fp32 copy would add another 256 MiB


# ----------------------------------------------------------------------------------- bundle level
@pytest.fixture(scope="module")
def bank(tiny_cohort: Path, tmp_path_factory) -> Path:
    """configs/build_bank.json on the tiny cohort (pass 1 only)."""
    folder = tmp_path_factory.mktemp("bank") / "bank"
    evaluator = _workflow(BUILD, dataset_dir=str(tiny_cohort), bank_dir=str(folder))
    assert evaluator.tokenizer.counts["encoded"] == 6
    return folder


@pytest.fixture(scope="module")
def new_cohort(tiny_cohort: Path, tmp_path_factory) -> Path:
    """Two new scans on the bank's grid, named like the bank's first two but with other contents
    (the bank's sub-0005 and sub-0006 with a smooth multiplicative intensity change), and, as
    ``old-0004``, a byte-identical copy of the bank's scan ``sub-0004`` sent again."""
    import nibabel as nib

    folder = tmp_path_factory.mktemp("new") / "new"
    rng = np.random.default_rng(5)
    rows = []
    for new, source in (("sub-0001", "sub-0005"), ("sub-0002", "sub-0006"), ("old-0004", "sub-0004")):
        for sub in ("images", "masks", "labels"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            src, dst = tiny_cohort / sub / f"{source}.nii.gz", folder / sub / f"{new}.nii.gz"
            if sub == "images" and new != "old-0004":
                image = nib.load(src)
                gain = 1 + 0.1 * np.kron(rng.standard_normal((4, 4, 4)), np.ones((8, 8, 8)))
                data = (np.asarray(image.dataobj) * gain).astype(np.float32)
                nib.save(nib.Nifti1Image(data, image.affine, image.header), dst)
            else:
                dst.write_bytes(src.read_bytes())
        rows.append({k: f"{k}s/{new}.nii.gz" for k in ("image", "mask", "label")})
    with open(folder / "cohort.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_new_volumes_scored_against_bank_equal_brute_force(bank: Path, new_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rho = 0.5  # K = floor(0.5 * 6) = 3 of the 6 bank volumes (2 of 5 for the scan already in the bank)
    evaluator = _workflow(
        CONFIGS,
        dataset_dir=str(new_cohort),
        output_dir=str(out),
        references=f"bank:{bank}",
        rho=rho,
        **{"evaluator#keep_tokens": True},  # the test reads evaluator.cohort.bank after the run
    )
    names = ["sub-0001", "sub-0002", "old-0004"]
    with open(out / "scores.csv") as f:
        assert [r["image"] for r in csv.DictReader(f)] == names  # the new volumes only
    assert sorted(p.name for p in out.glob("*_anomaly.nii.gz")) == sorted(f"{n}_anomaly.nii.gz" for n in names)
    run = json.loads((out / "run.json").read_text())
    assert run["encoded_volumes"] == 3 and run["n_volumes"] == 3  # the bank is not encoded again
    # a volume is never its own reference: the resent scan is matched against the 5 other bank volumes
    assert run["reference_bank"]["n_volumes"] == 6 and run["reference_bank"]["excluded_self"] == ["old-0004"]
    refs = TokenBank(bank).references("")
    for key, (ref_tokens, ref_valid) in refs.items():
        grids = [evaluator.cohort.bank[""][n].grids[key] for n in names]
        queries = torch.stack([g.tokens.reshape(-1, 128) for g in grids])
        query_valid = torch.stack([g.valid.reshape(-1) for g in grids])
        got = torch.stack([evaluator.scoring.token_scores[""][n][key].reshape(-1) for n in names]).double()
        expected = brute_force_against(queries[:2], query_valid[:2], ref_tokens, ref_valid.clone(), rho)
        torch.testing.assert_close(got[:2], expected, atol=1e-4, rtol=1e-4)
        others = [0, 1, 2, 4, 5]  # the bank without sub-0004 (index 3)
        expected = brute_force_against(queries[2:], query_valid[2:], ref_tokens[others], ref_valid[others], rho)
        torch.testing.assert_close(got[2:], expected, atol=1e-4, rtol=1e-4)


def _input_error(**overrides) -> str:
    from scripts.errors import find_input_error

    with pytest.raises(Exception) as info:
        _workflow(CONFIGS, **overrides)
    found = find_input_error(info.value)
    assert found is not None, f"not an input error: {info.value!r}"
    assert "\n" not in str(found)
    return str(found)


def test_manifest_mismatch_is_one_clear_line(bank: Path, new_cohort: Path, tmp_path: Path) -> None:
    common = {"dataset_dir": str(new_cohort), "output_dir": str(tmp_path / "o"), "references": f"bank:{bank}"}
    line = _input_error(**common, d=64)
    assert "was built with another configuration" in line and "d (bank 128, run 64)" in line
    line = _input_error(**common, q=[4, 4, 4], **{"finishing#0#k": [8, 8, 8]})
    assert "q (bank [8, 8, 8], run [4, 4, 4])" in line and "d (" not in line
    line = _input_error(**common, image_size=64)
    assert "encoder.input_size (bank 32, run 64)" in line and "preprocessing" not in line
    line = _input_error(**common, **{"intensity#0#lower": 1.0})
    changed = "preprocessing.transforms.6:ScaleIntensityRangePercentilesd.scaler.lower"
    assert f"{changed} (bank 0.0, run 1.0)" in line
    line = _input_error(**common, variant="MS", depth_phases=1, **{"inferer#q_fine": [2, 2, 2]})
    assert "no fine tokens" in line, line
    line = _input_error(**{**common, "references": f"bank:{tmp_path}"})
    assert "is not a token bank" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory map (Linux)")
def test_token_bank_views_are_read_only_memmaps(bank: Path) -> None:
    """README: the bank is memory-mapped (so a bank larger than RAM works): the tensors TokenBank
    hands out are read-only views of the files' pages, not copies in memory."""
    opened = TokenBank(bank)
    spec = opened.parts[""]["keys"]["axial/0"]
    tokens, valid = opened.references("")["axial/0"]
    assert tokens.dtype == torch.float16 and valid.dtype == torch.bool
    for tensor, rel in ((tokens, spec["tokens"]), (valid, spec["valid"])):
        perms = _mapping_of(tensor, bank / rel)
        assert perms is not None, f"{rel}: the tensor's data is not in a mapping of the file (a copy?)"
        assert "w" not in perms, f"{rel}: mapped {perms}, not read-only"
    grid = VolumeTokens((32, 32, 32), {"axial/0": TokenGrid(tokens[0].view(-1, 4, 4, 128), valid[0].view(-1, 4, 4))})
    assert grid.num_tokens() == 2 * 64  # 4 x 4 x 4 tokens at each of the default's two pooling phases


def test_bank_writer_streams_volumes_and_truncates_to_those_added(tmp_path: Path) -> None:
    """Volume by volume into open_memmap files of `capacity` rows; fewer volumes (skipped inputs)
    give arrays of exactly the volumes added; two parts (as the lung workflow makes) side by side."""
    from scripts.storage.bank import BankWriter

    volumes = random_volumes(3)
    writer = BankWriter(tmp_path / "bank", capacity=5)
    for i, vt in enumerate(volumes):
        for part in ("right", "left"):
            writer.add(f"v{i}", part, vt)
    assert not (tmp_path / "bank" / "bank.json").exists()  # no manifest until finished
    writer.finish({"d": 8}, {"v1": "abc"})
    bank = TokenBank(tmp_path / "bank")
    assert bank.names == ["v0", "v1", "v2"] and bank.manifest["sources"] == ["", "abc", ""]
    assert bank.index_of_source("abc") == 1 and bank.index_of_source("") is None
    for part in ("right", "left"):
        refs = bank.references(part)
        for key, (tokens, valid) in refs.items():
            assert tokens.shape == (3, volumes[0].grids[key].valid.numel(), 8)
            for i, vt in enumerate(volumes):
                assert torch.equal(tokens[i], vt.grids[key].tokens.reshape(-1, 8).half())
                assert torch.equal(valid[i], vt.grids[key].valid.reshape(-1))
    assert not list((tmp_path / "bank").rglob("*.tmp*"))
    w = BankWriter(tmp_path / "b2", capacity=3)
    w.add("a", "", volumes[0])
    w.add("b", "", volumes[1])
    with pytest.raises(ValueError, match="already added"):
        w.add("a", "", volumes[2])
