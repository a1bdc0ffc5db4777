"""Rebuilds ``benchmarks/data/fashion-mnist-10k.npz`` from the official files.

    python -m benchmarks.make_subset [--data-dir /usr/share/datasets/fashion-mnist]

The subset is the first 10,000 of the 60,000 official Fashion-MNIST training
images and the first 5,000 of the 10,000 official test images, as uint8
arrays ``x_train (10000, 28, 28)``, ``y_train``, ``x_test (5000, 28, 28)``,
``y_test`` in a compressed ``.npz``. The official files come from the Debian
package ``dataset-fashion-mnist``. The arrays are checked against
``benchmarks.datasets.SUBSET_SHA256`` (the zip container itself carries
timestamps, so its bytes differ between builds; its contents do not).
Fashion-MNIST is (c) 2017 Zalando SE, MIT licence: see
``benchmarks/data/LICENSE-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from benchmarks import datasets


def build(data_dir: str, out: pathlib.Path) -> str:
    """Writes the subset of the official files in ``data_dir`` to ``out``.

    Args:
        data_dir: the folder of the four official IDX ``.gz`` files.
        out: the ``.npz`` to write.

    Returns:
        The sha256 of the subset's arrays (``benchmarks.datasets.arrays_sha256``).
    """
    root = pathlib.Path(data_dir)
    arrays = {
        k: datasets.read_idx(root / name) for k, name in datasets.FASHION_FILES.items()
    }
    n_train, n_test = datasets.SUBSET_SIZES["train"], datasets.SUBSET_SIZES["test"]
    subset = {
        "x_train": arrays["x_train"][:n_train],
        "y_train": arrays["y_train"][:n_train],
        "x_test": arrays["x_test"][:n_test],
        "y_test": arrays["y_test"][:n_test],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **subset)
    return datasets.arrays_sha256(subset)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_subset")
    p.add_argument("--data-dir", default=datasets.FASHION_DIR)
    p.add_argument("--out", type=pathlib.Path, default=datasets.SUBSET_FILE)
    p.add_argument(
        "--force",
        action="store_true",
        help="write --out even if the contents differ from the recorded sha256",
    )
    args = p.parse_args(argv)
    staged = args.out.with_name(args.out.name + ".new.npz")
    try:
        sha = build(args.data_dir, staged)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if sha != datasets.SUBSET_SHA256 and not args.force:
        staged.unlink()
        sys.exit(
            f"error: the subset of {args.data_dir} has sha256 {sha}, not the "
            f"recorded {datasets.SUBSET_SHA256}; {args.out} is left as it was "
            f"(--force writes it anyway)"
        )
    staged.replace(args.out)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); contents "
        f"sha256 {sha}"
        + (" (as recorded)" if sha == datasets.SUBSET_SHA256 else " (NOT as recorded)")
    )


if __name__ == "__main__":
    main()
