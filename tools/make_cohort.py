"""Write a simulated scanner-site cohort (images/ + masks/) from real heads: the data behind the default model,
the demo and the Table 1 benchmark.

    python tools/make_cohort.py --site ge3 --subjects 4 --heads colin27 robex_atlas -o /tmp/ge3

Subject 0 of a head is the head itself; subjects 1.. are random deformations (sites.random_subject). Each is then
"scanned" by the site (sites.simulate_site) with its own seed. Heads come from ../shared/data/heads when present
(full resolution), else from the demo copies bundled with the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ConvLoRASegLib.sites import SITES, demo_heads, random_subject, simulate_site  # noqa: E402
from ConvLoRASegLib.volumes import read_image, write_image  # noqa: E402

SHARED_HEADS = ROOT.parent / "shared" / "data" / "heads"


def silver_mask(head: str) -> Optional[Path]:
    """The head's silver-standard mask (STAPLE of shipped mask, ROBEX, deepbet; see the heads' README), if any."""
    p = SHARED_HEADS / head / "mask_silver.nii.gz"
    return p if p.is_file() else None


def available_heads() -> Dict[str, Tuple[Path, Path]]:
    """name -> (image, mask): the full-resolution shared heads if present, else the bundled demo heads."""
    if SHARED_HEADS.is_dir():
        heads = {p.name: (p / "image.nii.gz", p / "mask.nii.gz") for p in sorted(SHARED_HEADS.iterdir())
                 if (p / "image.nii.gz").is_file() and (p / "mask.nii.gz").is_file()}
        if heads:
            return heads
    return demo_heads()


def subject_seed(head: str, k: int, site: str, seed: int) -> int:
    """A stable seed per (head, subject, site, experiment seed)."""
    import zlib

    return zlib.crc32(f"{head}/{k}/{site}/{seed}".encode()) & 0x7FFFFFFF


def make_site_cohort(site: str, subjects: int, heads: Sequence[str], out: Path, seed: int = 0,
                     first_subject: int = 0, severity: float = 1.0, overwrite: bool = False) -> List[Tuple[Path, Path]]:
    """Simulate ``subjects`` subjects per head at ``site``; returns the (image, mask) files written.

    Where a head has a silver-standard mask it goes through the same deformation and grid into ``masks_silver/``
    (the images and shipped masks are exactly those written without it)."""
    all_heads = available_heads()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written = []
    for head in heads:
        img_path, mask_path = all_heads[head]
        image, mask = read_image(img_path), read_image(mask_path)
        silver_path = silver_mask(head)
        also = (read_image(silver_path),) if silver_path else ()
        if also:
            (out / "masks_silver").mkdir(parents=True, exist_ok=True)
        for k in range(first_subject, first_subject + subjects):
            name = f"{head}_s{k}_{site}.nii.gz"
            dst_i, dst_m, dst_s = out / "images" / name, out / "masks" / name, out / "masks_silver" / name
            if dst_i.exists() and dst_m.exists() and (not also or dst_s.exists()) and not overwrite:
                written.append((dst_i, dst_m))
                continue
            subj = (image, mask, *also) if k == 0 else random_subject(
                image, mask, seed=subject_seed(head, k, "anat", seed), also=also)
            si, sm, *ss = simulate_site(subj[0], subj[1], site, seed=subject_seed(head, k, site, seed),
                                        severity=severity, also=subj[2:])
            write_image(si, dst_i, overwrite=True)
            write_image(sm, dst_m, overwrite=True)
            if ss:
                write_image(ss[0], dst_s, overwrite=True)
            written.append((dst_i, dst_m))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", required=True, choices=sorted(SITES))
    ap.add_argument("--subjects", type=int, default=3, help="subjects per head")
    ap.add_argument("--first-subject", type=int, default=0)
    ap.add_argument("--heads", nargs="*", default=None, help="head names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--severity", type=float, default=1.0)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args(argv)
    heads = a.heads or list(available_heads())
    files = make_site_cohort(a.site, a.subjects, heads, a.out, a.seed, a.first_subject, a.severity)
    print(f"{len(files)} volumes in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
