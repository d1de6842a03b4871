"""Tests for granular.data: the data-set specs, loader determinism, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from granular.data import DEFAULT_DATASET, DataBundle, list_datasets, load_data
from granular.errors import DataError


def _batches(loader, n=3):
    out = []
    for i, (x, y) in enumerate(loader):
        if i == n:
            break
        out.append((x.clone(), y.clone()))
    return out


def _same(a, b):
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _assert_one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message, repr(message)
    return message


def _write_pngs(folder, classes=("cat", "dog"), per_class=5, size=(40, 30)):
    from PIL import Image

    for c, name in enumerate(classes):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = (40 * c + 20 * i, 100, 200 - 30 * c)
            Image.new("RGB", size, color).save(d / f"{i}.png")


# --------------------------------------------------------------------------- digits


def test_default_is_digits_and_listed():
    assert DEFAULT_DATASET == "digits"
    names = list_datasets()
    assert "digits" in names and "fake" in names and "cifar10" in names


def test_digits_shapes_classes_split():
    data = load_data("digits", batch_size=32, seed=0)
    assert isinstance(data, DataBundle)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)
    assert len(data.train_set) + len(data.val_set) == 1797
    assert len(data.val_set) == 360 and len(data.train_set) == 1437
    x, y = next(iter(data.train_loader(0)))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < 10
    # Normalised with train statistics.
    train_x = data.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-4
    # Stratified: every class in both splits.
    assert set(data.train_set.tensors[1].tolist()) == set(range(10))
    assert set(data.val_set.tensors[1].tolist()) == set(range(10))
    assert data.example_input().shape == (2, 1, 8, 8)
    assert data.example_input(5).abs().sum() == 0
    # drop_last: every train batch is full.
    assert len(data.train_loader(0)) == 1437 // 32
    assert all(xb.shape[0] == 32 for xb, _ in data.train_loader(1))


def test_digits_batches_depend_on_seed_and_epoch_only():
    a = load_data("digits", batch_size=16, seed=3)
    b = load_data("digits", batch_size=16, seed=3)
    assert _same(_batches(a.train_loader(2)), _batches(b.train_loader(2)))
    assert _same(_batches(a.train_loader(2)), _batches(a.train_loader(2)))
    assert not _same(_batches(a.train_loader(2)), _batches(a.train_loader(3)))
    c = load_data("digits", batch_size=16, seed=4)
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])  # different split


def test_val_loader_not_shuffled_and_keeps_last_batch():
    data = load_data("digits", batch_size=64)
    ys = torch.cat([y for _, y in data.val_loader()])
    assert torch.equal(ys, data.val_set.tensors[1])


def test_limit():
    data = load_data("digits", batch_size=8, limit=40)
    assert len(data.train_set) == 40 and len(data.val_set) == 10
    with pytest.raises(DataError) as excinfo:
        load_data("digits", batch_size=64, limit=10)
    _assert_one_line(excinfo)


# --------------------------------------------------------------------------- fake


def test_fake_is_deterministic():
    data = load_data("fake", batch_size=16)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert (len(data.train_set), len(data.val_set)) == (256, 64)
    x0, y0 = data.train_set[5]
    x1, y1 = data.train_set[5]
    assert x0.shape == (3, 32, 32) and torch.equal(x0, x1) and y0 == y1
    assert not torch.equal(data.train_set[0][0], data.val_set[0][0])
    x, _ = next(iter(data.train_loader(0)))
    assert x.shape == (16, 3, 32, 32)


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_single_folder_split(tmp_path):
    _write_pngs(tmp_path, per_class=5)
    data = load_data(f"imagefolder:{tmp_path}", batch_size=4, image_size=16, augment=True)
    assert (data.num_classes, data.in_channels, data.image_size) == (2, 3, 16)
    assert len(data.train_set) == 8 and len(data.val_set) == 2  # one image per class held out
    val_labels = sorted(int(data.val_set[i][1]) for i in range(len(data.val_set)))
    assert val_labels == [0, 1]
    x, y = next(iter(data.train_loader(0)))
    assert x.shape == (4, 3, 16, 16)
    xv, _ = next(iter(data.val_loader()))
    assert xv.shape == (2, 3, 16, 16)
    # The split is fixed by the seed.
    again = load_data(f"imagefolder:{tmp_path}", batch_size=4, image_size=16)
    assert list(again.val_set.indices) == list(data.val_set.indices)


def test_imagefolder_train_val_subfolders(tmp_path):
    _write_pngs(tmp_path / "train", per_class=3)
    _write_pngs(tmp_path / "val", per_class=2)
    data = load_data(f"imagefolder:{tmp_path}", batch_size=2, image_size=24)
    assert (len(data.train_set), len(data.val_set), data.num_classes) == (6, 4, 2)
    x, _ = next(iter(data.val_loader()))
    assert x.shape == (2, 3, 24, 24)
    assert load_data(f"imagefolder:{tmp_path}", batch_size=2).example_input().shape == (2, 3, 224, 224)


# --------------------------------------------------------------------------- errors


def test_missing_dir_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as excinfo:
        load_data(f"imagefolder:{missing}")
    message = _assert_one_line(excinfo)
    assert str(missing) in message and "does not exist" in message


def test_empty_dir_raises(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_data(f"imagefolder:{tmp_path}")
    _assert_one_line(excinfo)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError) as excinfo:
        load_data(f"imagefolder:{tmp_path}")
    _assert_one_line(excinfo)


def test_unknown_spec_raises():
    with pytest.raises(DataError) as excinfo:
        load_data("mnist")
    message = _assert_one_line(excinfo)
    assert "mnist" in message and "digits" in message and "cifar10" in message
    with pytest.raises(DataError) as excinfo:
        load_data("imagefolder:")
    _assert_one_line(excinfo)


@pytest.mark.parametrize("spec, title, folder", [("cifar10", "CIFAR-10", "cifar-10-batches-py"),
                                                 ("cifar100", "CIFAR-100", "cifar-100-python")])
def test_missing_cifar_root_raises(tmp_path, spec, title, folder):
    with pytest.raises(DataError) as excinfo:
        load_data(spec, root=tmp_path)
    message = _assert_one_line(excinfo)
    assert title in message and str(tmp_path) in message and folder in message and "digits" in message


def test_cifar_root_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRANULAR_DATA", str(tmp_path / "env-root"))
    with pytest.raises(DataError) as excinfo:
        load_data("cifar10")
    assert str(tmp_path / "env-root") in _assert_one_line(excinfo)


def test_cifar_transforms_shapes():
    from PIL import Image

    from granular.datasets import cifar_transforms

    image = Image.new("RGB", (32, 32), (120, 60, 200))
    for kind, patch in (("cifar10", 16), ("cifar100", 8)):
        train_tf, val_tf = cifar_transforms(kind, augment=True)
        assert val_tf(image).shape == (3, 32, 32)
        out = train_tf(image)
        assert out.shape == (3, 32, 32)
        # Cutout: a patch x patch square of zeros (a uniform image may add more zeros, never fewer).
        assert int((out == 0).all(dim=0).sum()) >= patch * patch


def test_bad_options_raise():
    for kwargs in ({"batch_size": 0}, {"limit": 0}, {"num_workers": -1}, {"image_size": 32}):
        with pytest.raises(DataError) as excinfo:
            load_data("digits", **kwargs)
        _assert_one_line(excinfo)
