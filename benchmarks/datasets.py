"""The benchmarks' data: loading, fixed splits and integrity checks.

Image datasets (``benchmarks.train``):

* ``fashion-mnist-10k``: ``benchmarks/data/fashion-mnist-10k.npz``, shipped
  with the repository: the first 10,000 of the 60,000 official Fashion-MNIST
  training images and the first 5,000 of the 10,000 official test images,
  checked against their recorded sha256 (``python -m benchmarks.make_subset``
  rebuilds it);
* ``fashion-mnist``: the official IDX files (Debian package
  ``dataset-fashion-mnist``);
* ``digits``: scikit-learn's 1,797 bundled 8x8 images, stratified 80/20 with
  ``random_state=0`` (1,437 train / 360 test).

Text corpus (``benchmarks.lm``):

* ``stdlib``: the Python standard library's own ``*.py`` source files as bytes
  (``load_stdlib_corpus``), split by file: a file is held out iff the sha256
  of its relative POSIX path, read as an integer, is 0 modulo 10.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pathlib
import sysconfig
import zipfile
from typing import NamedTuple

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
DATA_DIR = pathlib.Path(__file__).parent / "data"
SUBSET_FILE = DATA_DIR / "fashion-mnist-10k.npz"
SUBSET_SIZES = {"train": 10_000, "test": 5_000}
# sha256 of x_train, y_train, x_test, y_test's bytes, in that order (uint8).
SUBSET_SHA256 = "ed034e8d89dea1ef6745d0a25a44741530c5a7342f7e554f7f22ba66d9800a61"


def load_digits():
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Reads one gzipped IDX file of unsigned bytes.

    Args:
        path: an IDX file compressed with gzip, as Fashion-MNIST ships them.

    Returns:
        The uint8 array, in the shape the file's header gives.

    Raises:
        ValueError: naming ``path``, if it is not a gzipped unsigned-byte IDX
            file or holds fewer or more values than its header says.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(
            f"{path}: expected {math.prod(shape)} values, got {array.size}"
        )
    return array.reshape(shape)


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in ("x_train", "y_train", "x_test", "y_test"):
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def _scale(arrays, n_train=None):
    """uint8 arrays -> float32 images in [0, 1] with a channel axis, int32 labels."""
    n = len(arrays["x_train"]) if n_train is None else n_train
    return (
        (arrays["x_train"][:n] / 255.0).astype(np.float32)[..., None],
        arrays["y_train"][:n].astype(np.int32),
        (arrays["x_test"] / 255.0).astype(np.float32)[..., None],
        arrays["y_test"].astype(np.int32),
    )


def load_subset(path: pathlib.Path | None = None, train_subset: int | None = None):
    """Loads the shipped Fashion-MNIST subset, checked against its sha256.

    Args:
        path: the ``.npz`` file (default: the one shipped in ``benchmarks/data``).
        train_subset: keep only the first N training images (default: all).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 images in [0, 1] of shape
        ``(N, 28, 28, 1)`` and int32 labels.

    Raises:
        FileNotFoundError: if ``path`` is missing; the message says how to
            restore it.
        ValueError: if ``path`` is not the recorded subset (not an ``.npz``,
            other arrays, or contents whose sha256 differs).
    """
    path = pathlib.Path(SUBSET_FILE if path is None else path)
    rebuild = (
        f"Restore it with `git checkout -- {path.name}` in {path.parent}, or "
        f"rebuild it from the official files with `python -m benchmarks."
        f"make_subset` (Debian package dataset-fashion-mnist)."
    )
    if not path.exists():
        raise FileNotFoundError(
            f"the Fashion-MNIST subset {path} is missing; it ships with the "
            f"repository. {rebuild}"
        )
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is corrupt: not an .npz (zip) file. {rebuild}")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path} is corrupt ({e}). {rebuild}") from e
    expected = {
        "x_train": (SUBSET_SIZES["train"], 28, 28),
        "y_train": (SUBSET_SIZES["train"],),
        "x_test": (SUBSET_SIZES["test"], 28, 28),
        "y_test": (SUBSET_SIZES["test"],),
    }
    got = {k: (np.shape(a), getattr(a, "dtype", type(a))) for k, a in arrays.items()}
    if got != {k: (s, np.dtype(np.uint8)) for k, s in expected.items()}:
        raise ValueError(
            f"{path} is corrupt: expected uint8 arrays {expected}, found {got}. "
            f"{rebuild}"
        )
    if arrays_sha256(arrays) != SUBSET_SHA256:
        raise ValueError(
            f"{path} is corrupt: its contents do not match the recorded sha256 "
            f"{SUBSET_SHA256}. {rebuild}"
        )
    return _scale(arrays, train_subset)


def load_fashion_mnist(data_dir: str, train_subset: int | None = None):
    """Loads the official Fashion-MNIST files from ``data_dir``.

    Args:
        data_dir: the folder of the four official IDX ``.gz`` files.
        train_subset: keep only the first N training images (default: all).

    Returns:
        ``(x_train, y_train, x_test, y_test)`` as ``load_subset`` returns them.

    Raises:
        FileNotFoundError: naming the missing files, the Debian package and
            ``--data-dir``.
        ValueError: if a file is not a Fashion-MNIST split.
    """
    root = pathlib.Path(data_dir)
    missing = [name for name in FASHION_FILES.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in --data-dir {root}: "
            f"{', '.join(missing)}.\nInstall the Debian package "
            f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist puts "
            f"them in {FASHION_DIR}) or pass --data-dir pointing at the four IDX "
            f".gz files. The default dataset, fashion-mnist-10k, needs neither."
        )
    arrays = {k: read_idx(root / name) for k, name in FASHION_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(
                f"{root}: {split} images {x.shape} and labels {y.shape} do "
                f"not form a Fashion-MNIST split"
            )
        if y.max(initial=0) > 9:
            raise ValueError(f"{root}: {split} labels outside 0..9")
    return _scale(arrays, train_subset)


# --- the standard library as a byte corpus (benchmarks.lm) ------------------------

# A path with any of these components is left out: installed packages, the
# test suites, byte-code caches.
STDLIB_EXCLUDED = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
FILE_SEPARATOR = b"\n"  # follows every file in the concatenated bytes
HELD_OUT_MODULUS = 10


def stdlib_dir() -> str:
    """The running Python's standard library folder, ``sysconfig``'s ``stdlib``."""
    return sysconfig.get_paths()["stdlib"]


def is_held_out(relative_path: str) -> bool:
    """The split rule: held out iff ``int(sha256(path), 16) % 10 == 0``.

    ``relative_path`` is the POSIX path relative to the corpus root (e.g.
    ``"json/decoder.py"``), hashed as UTF-8. It depends on the path alone, so
    a file keeps its side of the split on every Python version that has it.
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return int(digest, 16) % HELD_OUT_MODULUS == 0


class Corpus(NamedTuple):
    """A byte corpus split by file (``load_stdlib_corpus``).

    Attributes:
      train: uint8 array, the training files' bytes concatenated in path
        order, each followed by ``FILE_SEPARATOR``.
      held_out: uint8 array, the held-out files' bytes, likewise.
      train_paths: the training files' relative POSIX paths, sorted.
      held_out_paths: the held-out files' relative POSIX paths, sorted.
      sha256: fingerprint of the corpus: sha256 over the sorted
        ``(path, sha256 of the file's bytes)`` pairs, each written as
        ``path NUL hexdigest LF``; any added, removed, renamed or changed file
        changes it.
      root: the folder read.
    """

    train: np.ndarray
    held_out: np.ndarray
    train_paths: tuple[str, ...]
    held_out_paths: tuple[str, ...]
    sha256: str
    root: str


def _corpus_files(root: pathlib.Path) -> list[str]:
    """Every ``*.py`` under ``root`` outside ``STDLIB_EXCLUDED``, sorted POSIX paths.

    Symbolic links to folders are not followed (``os.walk``'s default).
    """
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED]
        rel = pathlib.Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if f.endswith(".py")]
    return sorted(found)


def load_stdlib_corpus(root: str | os.PathLike | None = None) -> Corpus:
    """Reads a folder of Python sources (default: the standard library) as bytes.

    Every ``*.py`` file under ``root`` whose relative path has no component in
    ``STDLIB_EXCLUDED`` (``site-packages``, ``dist-packages``, ``test``,
    ``tests``, ``idle_test``, ``__pycache__``), read as bytes, sorted by
    relative POSIX path and split by file with ``is_held_out`` (about 10%
    held out). On Python 3.11 the standard library gives about 730 files,
    12 MB.

    Args:
      root: the folder (default: ``stdlib_dir()``).

    Returns:
      A :class:`Corpus`.

    Raises:
      FileNotFoundError: naming ``root``, if it is not a folder.
      ValueError: naming ``root``, if it holds no such file.
    """
    root = pathlib.Path(stdlib_dir() if root is None else root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} does not exist")
    paths = _corpus_files(root)
    if not paths:
        raise ValueError(
            f"corpus folder {root} holds no *.py files (outside "
            f"{', '.join(sorted(STDLIB_EXCLUDED))})"
        )
    digest = hashlib.sha256()
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    names: dict[bool, list[str]] = {True: [], False: []}
    for path in paths:
        data = (root / path).read_bytes()
        digest.update(f"{path}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        held = is_held_out(path)
        parts[held] += [data, FILE_SEPARATOR]
        names[held].append(path)

    def as_array(chunks: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(chunks), np.uint8).copy()

    return Corpus(
        train=as_array(parts[False]),
        held_out=as_array(parts[True]),
        train_paths=tuple(names[False]),
        held_out_paths=tuple(names[True]),
        sha256=digest.hexdigest(),
        root=str(root),
    )
