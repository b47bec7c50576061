"""Peak memory of the ``.pt`` reader (models/torch_reader.py) on the crafted files of issue 21.

  python benchmarks/torch_reader_memory.py

Each file is written by ``torch.save`` (views of one storage keep sharing it), the last one
then given a zip directory that lies. The reader's allocations are traced with tracemalloc
(numpy reports its buffers to it); the table shows the peak next to the bound the reader
promises, ``file bytes + MAX_EXPANSION x file bytes + cap`` (docs/clip.md, "Memory"):

* ``expand_8190``: one stored uint8 expanded to 8190 x 8190 (63.97 MiB, under the cap);
* ``views_32mib``: a 32 MiB uint8 storage seen as a 4x expanded copy, its transpose and a
  strided column (160 MiB of tensors);
* ``claimed_25mib``: one stored float expanded to 80 MiB, next to an extra entry (no tensor
  uses it) whose directory record claims 25 MiB: must be refused (over 4 x 4 bytes + cap).

Runs on CPU in a few seconds; needs torch (to write the files) and about 300 MB of memory.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import torch

# Run from a checkout without `pip install -e .`.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ucofia_jax.errors import CheckpointError  # noqa: E402 -- after the path set-up above
from ucofia_jax.models import torch_reader  # noqa: E402

MIB = 1 << 20


def claim_size(path: str, entry_suffix: str, claimed: int) -> None:
    """Set the compressed and uncompressed sizes of ``entry_suffix``'s central directory
    record to ``claimed`` (its data stays as it is)."""
    data = bytearray(Path(path).read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len].endswith(entry_suffix.encode()):
            struct.pack_into("<II", data, at + 20, claimed, claimed)
            Path(path).write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 4)
    raise SystemExit(f"{entry_suffix} not found in {path}")


def write_cases(folder: str) -> dict[str, str]:
    paths = {}
    paths["expand_8190"] = os.path.join(folder, "expand.pt")
    torch.save(
        {"w": torch.full((1,), 7, dtype=torch.uint8).expand(8190, 8190)}, paths["expand_8190"]
    )
    n = 32 * MIB
    base = torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8)
    views = {
        "expanded": base.expand(4, n),
        "transposed": base.view(-1, 4096).T,
        "column": base[5::4096],
    }
    paths["views_32mib"] = os.path.join(folder, "views.pt")
    torch.save(views, paths["views_32mib"])
    paths["claimed_25mib"] = os.path.join(folder, "claimed.pt")
    torch.save({"w": torch.ones(1).expand(5 * MIB, 4)}, paths["claimed_25mib"])
    with zipfile.ZipFile(paths["claimed_25mib"], "a") as zf:  # an entry no tensor uses
        root = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{root}/data/extra", b"x")
    claim_size(paths["claimed_25mib"], "/data/extra", 25 * MIB)
    return paths


def measure(path: str) -> tuple[int, str]:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            sd = torch_reader.read_torch_file(path)
            outcome = f"loaded {sum(a.nbytes for a in sd.values()) / MIB:.1f} MiB"
            del sd
        except CheckpointError as e:
            outcome = "refused: " + str(e).split(": ", 2)[-1][:70]
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, outcome


def main() -> None:
    cap = torch_reader.cap_bytes_from_env()
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for name, path in write_cases(folder).items():
            size = os.path.getsize(path)
            bound = size + torch_reader.MAX_EXPANSION * size + cap
            peak, outcome = measure(path)
            rows.append((name, size, bound / MIB, peak / MIB, outcome))
    print(f"{'case':<14} {'file bytes':>11} {'bound MiB':>10} {'peak MiB':>9}  outcome")
    for name, size, bound, peak, outcome in rows:
        print(f"{name:<14} {size:>11} {bound:>10.2f} {peak:>9.2f}  {outcome}")


if __name__ == "__main__":
    main()
