"""Small shared test utilities: a tiny deterministic encoder and toy volumes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TinyEncoder(torch.nn.Module):
    """A fixed random 2-layer patch encoder with the SliceEncoder interface (fast, for unit tests).

    Layer 0: stride-4 patches, 8 channels; layer 1: stride-8 patches, 12 channels.
    """

    name = "tiny"

    def __init__(self, input_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.input_size = input_size
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)
        self.conv1 = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.conv2 = torch.nn.Conv2d(8, 12, 2, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.calls = 0
        self.max_batch = 0
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        self.max_batch = max(self.max_batch, x.shape[0])
        f1 = F.gelu(self.conv1(x))
        return [f1, F.gelu(self.conv2(f1))]


def blob_cohort(n: int = 8, size: int = 32, abnormal: tuple[int, ...] = (2, 5), seed: int = 0):
    """Smooth random volumes sharing one anatomy, with a bright blob in the ``abnormal`` ones.

    Returns ``(volumes [n, 1, S, S, S] in [0, 1], blob masks [n, 1, S, S, S] bool)``.
    """
    gen = torch.Generator().manual_seed(seed)
    base = F.avg_pool3d(torch.rand(1, 1, size, size, size, generator=gen), 5, stride=1, padding=2)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    vols, blobs = [], []
    for i in range(n):
        noise = F.avg_pool3d(torch.rand(1, 1, size, size, size, generator=gen), 5, stride=1, padding=2)
        vol = 0.7 * base + 0.3 * noise
        vol = (vol - vol.min()) / (vol.max() - vol.min())
        blob = torch.zeros(1, 1, size, size, size, dtype=torch.bool)
        if i in abnormal:
            centre = torch.randint(size // 3, 2 * size // 3, (3,), generator=gen).float()
            dist = (grid - centre.view(3, 1, 1, 1)).norm(dim=0)
            blob = (dist <= size / 8)[None, None]
            vol = torch.where(blob, torch.ones_like(vol), vol)
        vols.append(vol)
        blobs.append(blob)
    return torch.cat(vols), torch.cat(blobs)
