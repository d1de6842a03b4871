"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) for ``--dataset fashion-mnist``.

The data comes from the four gzipped idx files that the Debian package
``dataset-fashion-mnist`` installs in ``/usr/share/datasets/fashion-mnist/``, or the same
files in another folder; nothing is ever downloaded. torchvision's ``FashionMNIST`` reads
only the *uncompressed* files from its own ``FashionMNIST/raw/`` layout (and would
otherwise download), so the idx format is parsed here, in memory, with gzip and numpy; the
per-sample transforms are torchvision's.

Where the files are looked for, first match wins: ``--data-root DIR`` alone when given (DIR
itself or ``DIR/fashion-mnist``); otherwise ``$GRANULAR_DATA`` (itself or its
``fashion-mnist`` subfolder) when set, then the Debian folder.

The 60,000 training images train, the official 10,000-image test set validates: 1x28x28
tensors normalised with the training set's statistics, 10 classes.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from granular.errors import DataError

__all__ = ["PACKAGE", "DEBIAN_DIR", "FILES", "MEAN", "STD", "FashionMNIST", "candidate_dirs", "find_dir",
           "read_idx", "load_fashion_mnist"]

PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Statistics of the training images, pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530


def candidate_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for the files, in order (see the module docstring)."""
    if root is not None:
        bases = [Path(root).expanduser()]
    else:
        env = os.environ.get("GRANULAR_DATA")
        bases = ([Path(env).expanduser()] if env else []) + [DEBIAN_DIR]
    dirs: list[Path] = []
    for base in bases:
        for d in (base, base / "fashion-mnist"):
            if d not in dirs and not (base == DEBIAN_DIR and d != base):
                dirs.append(d)
    return dirs


def find_dir(root: str | os.PathLike | None = None) -> Path:
    """The first candidate folder holding all four files.

    Raises:
        DataError: none does; the one-line message names the package and the folders.
    """
    names = [n for pair in FILES.values() for n in pair]
    dirs = candidate_dirs(root)
    for d in dirs:
        if all((d / n).is_file() for n in names):
            return d
    where = ", ".join(str(d) for d in dirs)
    raise DataError(f"Fashion-MNIST not found (looked in {where}): install it with "
                    f"`apt-get install {PACKAGE}`, or put its four idx .gz files in --data-root DIR")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """A gzipped idx file of unsigned bytes (the MNIST format) as a uint8 tensor of its shape.

    Raises:
        DataError: the file is not such a file or is truncated.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({exc}): reinstall {PACKAGE} or replace the file") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes: reinstall {PACKAGE} or replace the file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(shape) != ndim or len(data) - header != int(np.prod(shape, dtype=np.int64)):
        raise DataError(f"{path} is truncated or corrupt: reinstall {PACKAGE} or replace the file")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy())


class FashionMNIST(Dataset):
    """Images (uint8, ``N x 1 x 28 x 28``) and labels held in memory; ``transform`` turns an
    image into the model's input when a sample is read (floats are made per batch, not kept).

    Attributes:
        data: the uint8 images.
        targets: the labels, 0..9 (``classes`` names them).
    """

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

    def __init__(self, folder: Path, split: str, transform=None):
        images_file, labels_file = FILES[split]
        images, labels = read_idx(folder / images_file), read_idx(folder / labels_file)
        if images.dim() != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DataError(f"{folder / images_file} and {labels_file} do not hold 28x28 images with one label "
                            f"each (shapes {tuple(images.shape)}, {tuple(labels.shape)}): reinstall {PACKAGE}")
        self.data = images.unsqueeze(1)
        self.targets = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.data[index]
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])


def transforms_for(augment: bool):
    """``(train, val)`` tensor transforms: to [0, 1] floats, normalised; training adds a
    4-pixel-padded random crop and a horizontal flip when ``augment`` (clothes stay clothes
    when mirrored, unlike digits)."""
    from torchvision import transforms

    val = transforms.Compose([transforms.ConvertImageDtype(torch.float32), transforms.Normalize((MEAN,), (STD,))])
    if not augment:
        return val, val
    train = transforms.Compose([transforms.RandomCrop(28, padding=4), transforms.RandomHorizontalFlip(), val])
    return train, val


def load_fashion_mnist(root: str | os.PathLike | None, augment: bool) -> tuple[FashionMNIST, FashionMNIST]:
    """``(train, validation)``: the 60,000 training images and the 10,000-image test set."""
    folder = find_dir(root)
    train_tf, val_tf = transforms_for(augment)
    return FashionMNIST(folder, "train", train_tf), FashionMNIST(folder, "test", val_tf)
