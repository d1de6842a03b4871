"""--dataset fashion-mnist: the idx reader (on the Debian package's files when installed, on a
tiny copy in the same format always), where it looks, --train-subset, the one-line error when
the files are missing, and a run directory that rebuilds the same data."""

from __future__ import annotations

import collections
import gzip
import json
import struct
import textwrap

import numpy as np
import pytest
import torch

from granular.cli import main
from granular.data import list_datasets, load_data
from granular.errors import DataError
from granular.fashion_mnist import DEBIAN_DIR, FILES, MEAN, STD, candidate_dirs, load_fashion_mnist, read_idx

from _models import assert_one_line_error

installed = pytest.mark.skipif(not all((DEBIAN_DIR / n).is_file() for pair in FILES.values() for n in pair),
                               reason=f"{DEBIAN_DIR} is absent: apt-get install dataset-fashion-mnist")

TINY_CNN = textwrap.dedent("""
    from torch import nn

    def model(num_classes=10, in_channels=1):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
""")


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _tiny_copy(folder, n_train=60, n_test=20):
    """The four files in the idx format, with few images: labels cycle through 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = FILES[split]
        _write_idx(folder / images, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / labels, np.arange(n) % 10)
    return folder


# --------------------------------------------------------------------------- the installed files


@installed
def test_reader_on_the_installed_files():
    train, val = load_fashion_mnist(DEBIAN_DIR, augment=False)
    assert (len(train), len(val)) == (60000, 10000)
    assert train.data.shape == (60000, 1, 28, 28) and train.data.dtype == torch.uint8
    for ds in (train, val):
        assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
    assert torch.equal(train.targets.bincount(), torch.full((10,), 6000))
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    # the stated statistics are the training set's
    pixels = train.data.float().div(255)
    assert abs(float(pixels.mean()) - MEAN) < 1e-3 and abs(float(pixels.std()) - STD) < 1e-3


@installed
def test_load_data_with_a_train_subset_on_the_installed_files():
    data = load_data("fashion-mnist", root=DEBIAN_DIR, batch_size=50, seed=1, subset=500)
    assert len(data.train_set) == 500 and len(data.val_set) == 10000
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    counts = collections.Counter(int(data.train_set.dataset.targets[i]) for i in data.train_set.indices)
    assert counts == {c: 50 for c in range(10)}  # stratified: 50 of each class
    again = load_data("fashion-mnist", root=DEBIAN_DIR, batch_size=50, seed=1, subset=500)
    assert again.train_set.indices == data.train_set.indices  # fixed by the seed


# --------------------------------------------------------------------------- the format, anywhere


def test_reader_on_a_copy_in_data_root(tmp_path):
    _tiny_copy(tmp_path / "fashion-mnist")
    for root in (tmp_path, tmp_path / "fashion-mnist"):  # the folder itself or its parent
        data = load_data("fashion-mnist", root=root, batch_size=10)
        assert (len(data.train_set), len(data.val_set)) == (60, 20)
        x, y = next(iter(data.train_loader(0)))
        assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    raw = read_idx(tmp_path / "fashion-mnist" / FILES["train"][0])
    x, _ = data.train_set[3]
    assert torch.allclose(x, (raw[3].float() / 255 - MEAN) / STD, atol=1e-6)  # normalised as stated
    assert "fashion-mnist" in list_datasets()


def test_where_it_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("GRANULAR_DATA", str(tmp_path / "env"))
    assert candidate_dirs(tmp_path / "root") == [tmp_path / "root", tmp_path / "root" / "fashion-mnist"]
    assert candidate_dirs(None) == [tmp_path / "env", tmp_path / "env" / "fashion-mnist", DEBIAN_DIR]
    _tiny_copy(tmp_path / "env" / "fashion-mnist", n_train=30)
    assert len(load_data("fashion-mnist", batch_size=10).train_set) == 30  # $GRANULAR_DATA before Debian's
    monkeypatch.delenv("GRANULAR_DATA")
    assert candidate_dirs(None) == [DEBIAN_DIR]


def test_missing_files_one_line_exit_2(tmp_path, capsys):
    code = main(["search", "darts:tiny", "--dataset", "fashion-mnist", "--data-root", str(tmp_path),
                 "--target-params", "1K", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "apt-get install dataset-fashion-mnist", str(tmp_path))
    assert not (tmp_path / "r").exists()


def test_corrupt_file_one_line(tmp_path):
    _tiny_copy(tmp_path)
    (tmp_path / FILES["test"][0]).write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\0" * 7))
    with pytest.raises(DataError) as excinfo:
        load_data("fashion-mnist", root=tmp_path, batch_size=10)
    assert "\n" not in str(excinfo.value) and "dataset-fashion-mnist" in str(excinfo.value)


# --------------------------------------------------------------------------- --train-subset


@pytest.mark.parametrize("n, needle", [("0", "positive integer"), ("-3", "positive integer"),
                                       ("61", "more than the 60 training samples")])
def test_bad_train_subset_one_line(tmp_path, capsys, n, needle):
    _tiny_copy(tmp_path / "data")
    code = main(["search", "darts:tiny", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "data"),
                 "--train-subset", n, "--target-params", "1K", "--out", str(tmp_path / "r")])
    assert_one_line_error(code, capsys.readouterr().err, "--train-subset", needle)


def test_train_subset_on_digits_is_stratified_and_nested():
    small = load_data("digits", batch_size=10, seed=0, subset=100).train_set
    large = load_data("digits", batch_size=10, seed=0, subset=300).train_set
    assert len(small) == 100 and set(small.indices) <= set(large.indices)
    counts = collections.Counter(int(small.dataset.tensors[1][i]) for i in small.indices)
    assert set(counts.values()) == {10}


def test_run_directory_rebuilds_the_same_data(tmp_path, capsys):
    from granular.cli.rundir import build_run, load_run_config

    data_dir = _tiny_copy(tmp_path / "data", n_train=80)
    (tmp_path / "model.py").write_text(TINY_CNN)
    out = tmp_path / "r"
    code = main(["search", str(tmp_path / "model.py"), "--dataset", "fashion-mnist", "--data-root", str(data_dir),
                 "--train-subset", "40", "--target-params", "900", "--epochs", "1", "--warmup-epochs", "0",
                 "--batch-size", "20", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err  # one epoch, one round, the budget's last: it lands
    run = json.loads((out / "config.json").read_text())
    assert (run["dataset"], run["data_root"], run["train_subset"]) == ("fashion-mnist", str(data_dir), 40)
    data, _, _ = build_run(load_run_config(out))
    assert len(data.train_set) == 40 and len(data.val_set) == 20
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    code = main(["search", str(tmp_path / "model.py"), "--resume", "--epochs", "2", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err  # the search is done: resuming it exports it again
