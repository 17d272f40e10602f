"""Record the MNIST-5k reference split: python -m training.make_split."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgefleet.server.datasets.mnist import load_mnist5k, mnist5k_sha256
from edgefleet.server.datasets.splits import MNIST5K_SPLIT_SEED, MNIST5K_SPLIT_SIZES, make_split
from edgefleet.server.reference import MNIST5K_DATASET, MNIST5K_SOURCE_FILE, SPLIT_PATH


def main(argv: list[str] | None = None) -> int:
    """Compute the split from the installed data and write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=SPLIT_PATH, help="where to write the JSON")
    args = parser.parse_args(argv)
    _, labels = load_mnist5k()
    split = make_split(
        dataset=MNIST5K_DATASET,
        source_file=MNIST5K_SOURCE_FILE,
        source_sha256=mnist5k_sha256(),
        labels=labels,
        sizes=MNIST5K_SPLIT_SIZES,
        seed=MNIST5K_SPLIT_SEED,
    )
    out: Path = args.out
    split.save(out)
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in split.sizes.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
