"""Copy a defense bundle with only the networks it deploys (C, M, P), for shipping in a repository.

    python scripts/ship_bundle.py SRC DST

The teacher, the discriminator and the undefended classifier stay in SRC (the training run):
fine-tuning, the same-scale baselines (``ism-edge train --init-from SRC``) and the oblivious threat
model of ``ism-edge evaluate`` need them. The weights keep SRC's ``weights_dtype``; the manifest's
``provenance.shipped_from`` records SRC's hash.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ism_edge.errors import IsmEdgeError
from ism_edge_training.bundle import DefenseBundle, bundle_hash


def main(src: str, dst: str) -> None:
    if Path(dst).resolve() == Path(src).resolve() or Path(src).resolve() in Path(dst).resolve().parents:
        sys.exit(f"error: {dst} is {src} or inside it: ship to another directory")
    if Path(dst).exists() and not (Path(dst) / "manifest.json").is_file():
        sys.exit(f"error: {dst} exists and is not a defense bundle: choose another directory")
    try:
        bundle = DefenseBundle.load(src)
        bundle.refuse_untrained(src, "shipped")
    except IsmEdgeError as e:
        sys.exit(f"error: {e}")
    shipped = bundle.deployed_only()
    shipped.provenance = {**bundle.provenance, "shipped_from": {"path": str(src), "sha256": bundle_hash(src)}}
    shipped.save(dst)
    print(f"{dst}: {', '.join(shipped.networks)} ({shipped.weights_dtype}) from {src}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
