"""Named-stage progress: plain lines without cursor codes off a terminal, throttled, with rate and time left."""

from __future__ import annotations

import io

from scripts.progress import Progress, format_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_throttled_and_name_the_stage() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("encoding volume", 10, unit="vol", stream=out, interval=5.0, clock=clock) as progress:
        for _ in range(10):
            clock.now += 2.0  # one volume every 2 s
            progress.update()
    lines = out.getvalue().splitlines()
    # a line at the first step (nothing shown yet), then at most one per 5 s, and the last step
    assert lines[0] == "cs3f: encoding volume 1/10 [0.5 vol/s, 18 s left]"
    assert lines[-1].startswith("cs3f: encoding volume 10/10 [0.5 vol/s, 0 s left]")
    # lines at t = 2, 8, 14 (5 s or more apart) and at the last step, t = 20
    assert [line.split()[3] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_detail_and_quiet() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("scoring axial/stage3", 4, unit="block", stream=out, clock=clock)
    clock.now = 1.0
    progress.update(detail="query block 1/4")
    assert out.getvalue() == "cs3f: scoring axial/stage3 1/4 (query block 1/4) [1 block/s, 3 s left]\n"
    silent = io.StringIO()
    quiet = Progress("x", 3, enabled=False, stream=silent, clock=clock)
    quiet.update(3)
    quiet.close()
    assert silent.getvalue() == ""


def test_close_writes_a_stage_that_never_printed() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("writing maps", 0, stream=out, clock=clock)
    progress.close()
    assert out.getvalue() == ""  # nothing done, nothing to say


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 42.4, 185, 3720)] == ["0 s", "42 s", "3 min 5 s", "1 h 02 min"]


def test_a_slow_scorer_reports_at_least_every_10_s_of_work(monkeypatch, capsys) -> None:
    """CS3F-C scoring reports each volume pair it finishes: with 3 s of (simulated) work per pair and a
    5 s line interval, no 10 s of work pass without a new line, and the line names the grid."""
    import scripts.progress as progress_module
    import scripts.scoring.exact as exact
    import torch
    from scripts.inferer import CS3FInferer
    from scripts.tokens import TokenGrid, VolumeTokens

    clock = FakeClock()
    monkeypatch.setattr(progress_module, "now", clock)
    block = exact._PairBlocks.block

    def slow_block(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        clock.now += 3.0
        return block(*args, **kwargs)

    monkeypatch.setattr(exact._PairBlocks, "block", slow_block)
    gen = torch.Generator().manual_seed(0)
    bank = [
        VolumeTokens(
            (8, 8, 8),
            {"axial/stage3": TokenGrid(torch.randn(2, 2, 2, 8, generator=gen), torch.ones(2, 2, 2, dtype=torch.bool))},
        )
        for _ in range(6)
    ]
    CS3FInferer(q=4, d=8, rho=0.4, progress=True).score(bank)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cs3f: scoring")]
    assert lines and all("axial/stage3" in line and "volume pair" in line for line in lines)
    done = [int(line.split("volume pair ")[1].split("/")[0]) for line in lines]
    assert done[-1] == 15  # 6 volumes: 15 pairs, the last one reported
    gaps = [3.0 * (b - a) for a, b in zip([0, *done], done, strict=False)]
    assert max(gaps) <= 10.0, gaps
