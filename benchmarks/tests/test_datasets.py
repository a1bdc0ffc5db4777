"""benchmarks.datasets: the shipped subset, the official files, their checks."""

import gzip
import pathlib

import numpy as np
import pytest

from benchmarks import datasets, make_subset, train

# --- the shipped subset -----------------------------------------------------------


def test_shipped_subset_loads_with_the_documented_split():
    x_train, y_train, x_test, y_test = datasets.load_subset()
    assert x_train.shape == (10_000, 28, 28, 1) and x_test.shape == (5_000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert 0.0 == x_train.min() and x_train.max() == 1.0
    # Fashion-MNIST's classes are nearly balanced in any large prefix.
    for labels, n in ((y_train, 10_000), (y_test, 5_000)):
        counts = np.bincount(labels, minlength=10)
        assert counts.sum() == n and counts.min() > 0.09 * n
    x_few, y_few, _, _ = datasets.load_subset(train_subset=100)
    np.testing.assert_array_equal(x_few, x_train[:100])
    np.testing.assert_array_equal(y_few, y_train[:100])


def test_missing_subset_says_how_to_restore_it(tmp_path, monkeypatch):
    missing = tmp_path / "fashion-mnist-10k.npz"
    with pytest.raises(FileNotFoundError, match="missing") as info:
        datasets.load_subset(missing)
    assert "git checkout" in str(info.value)
    assert "benchmarks.make_subset" in str(info.value)
    monkeypatch.setattr(datasets, "SUBSET_FILE", missing)
    with pytest.raises(SystemExit) as info:
        train.main(["--out", str(tmp_path / "out")])
    assert "missing" in str(info.value) and str(missing) in str(info.value)


def test_truncated_subset_is_reported_corrupt(tmp_path):
    data = datasets.SUBSET_FILE.read_bytes()
    broken = tmp_path / "broken.npz"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt") as info:
        datasets.load_subset(broken)
    assert "make_subset" in str(info.value)


@pytest.mark.parametrize("kind", ["directory", "npy", "empty", "plain zip"])
def test_other_files_at_the_subset_path_are_reported_corrupt(tmp_path, kind):
    path = tmp_path / "fashion-mnist-10k.npz"
    if kind == "directory":
        path.mkdir()
    elif kind == "npy":
        np.save(tmp_path / "a.npy", np.zeros(3))
        (tmp_path / "a.npy").rename(path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x_train.txt", "not an array")
    with pytest.raises(ValueError, match="is corrupt") as info:
        datasets.load_subset(path)
    assert str(path) in str(info.value) and "git checkout" in str(info.value)


def test_altered_subset_fails_the_checksum(tmp_path):
    with np.load(datasets.SUBSET_FILE) as f:
        arrays = {k: f[k].copy() for k in f.files}
    arrays["x_test"][17, 3, 5] ^= 1  # one pixel, one bit
    altered = tmp_path / "altered.npz"
    np.savez_compressed(altered, **arrays)
    with pytest.raises(ValueError, match="sha256"):
        datasets.load_subset(altered)
    arrays["x_test"] = arrays["x_test"][:10]
    np.savez_compressed(altered, **arrays)
    with pytest.raises(ValueError, match="expected uint8 arrays"):
        datasets.load_subset(altered)


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_official_files(folder, n_train=80, n_test=1003):
    rng = np.random.default_rng(0)
    folder.mkdir()
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28)),
        "y_train": rng.integers(0, 10, n_train),
        "x_test": rng.integers(0, 256, (n_test, 28, 28)),
        "y_test": rng.integers(0, 10, n_test),
    }
    for key, name in datasets.FASHION_FILES.items():
        _write_idx(folder / name, arrays[key])
    return arrays


def test_make_subset_round_trips_through_the_checked_loader(tmp_path, monkeypatch):
    arrays = fake_official_files(tmp_path / "official")
    monkeypatch.setattr(datasets, "SUBSET_SIZES", {"train": 50, "test": 8})
    out = tmp_path / "subset.npz"
    official = ["--data-dir", str(tmp_path / "official"), "--out", str(out)]
    with pytest.raises(SystemExit, match="not the recorded") as info:
        make_subset.main(official)  # other data than recorded: nothing written
    assert not out.exists() and list(tmp_path.glob("*.npz")) == []
    make_subset.main([*official, "--force"])
    sha = datasets.arrays_sha256(dict(np.load(out)))
    assert sha == make_subset.build(str(tmp_path / "official"), tmp_path / "b.npz")
    monkeypatch.setattr(datasets, "SUBSET_SHA256", sha)
    x_train, y_train, x_test, y_test = datasets.load_subset(out)
    np.testing.assert_array_equal(y_train, arrays["y_train"][:50])
    np.testing.assert_array_equal(y_test, arrays["y_test"][:8])
    np.testing.assert_allclose(x_test[..., 0], arrays["x_test"][:8] / 255.0, 1e-6)
    assert "the recorded" in str(info.value)


@pytest.mark.skipif(
    not pathlib.Path(datasets.FASHION_DIR, datasets.FASHION_FILES["x_train"]).is_file(),
    reason="needs the Debian package dataset-fashion-mnist",
)
def test_shipped_subset_is_the_official_prefix(tmp_path):
    sha = make_subset.build(datasets.FASHION_DIR, tmp_path / "rebuilt.npz")
    assert sha == datasets.SUBSET_SHA256
