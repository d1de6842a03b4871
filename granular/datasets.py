"""The data-set readers behind :func:`granular.data.load_data`: scikit-learn's digits, fake
images, CIFAR and image folders, with their transforms and train/validation splits, and the
seeded training subsets of ``--train-subset`` (Fashion-MNIST has its own module,
:mod:`granular.fashion_mnist`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from granular.errors import DataError

__all__ = ["load_digits", "load_fake", "load_cifar", "load_imagefolder", "cifar_transforms",
           "imagefolder_transforms", "mix_seed", "data_error", "check_subset", "train_subset"]

# Per-channel statistics of the CIFAR training sets (pixels in [0, 1]).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# ImageNet statistics: the usual choice for photographs of unknown provenance, and what
# pretrained backbones expect.
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_VAL_FRACTION = 0.2


def data_error(message: str) -> DataError:
    """Build a :class:`DataError` whose message is guaranteed to be one line."""
    return DataError(" ".join(str(message).split("\n")))


def mix_seed(seed: int, epoch: int, *more: int) -> int:
    """Combine a seed and an epoch (and more, e.g. a rank) into one 63-bit generator seed
    without collisions in practice."""
    entropy = [seed % 2**64, epoch % 2**64, *(m % 2**64 for m in more)]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def _targets(dataset) -> list[int] | None:
    """The class index of every sample, where the data set knows them without loading images."""
    if isinstance(dataset, Subset):
        inner = _targets(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return targets.tolist() if isinstance(targets, torch.Tensor) else [int(t) for t in targets]


def check_subset(n) -> None:
    """Raise the one-line :class:`DataError` of ``--train-subset`` unless ``n`` is a positive integer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise data_error(f"--train-subset must be a positive integer, got {n!r}: pass e.g. --train-subset 5000")


def train_subset(dataset: Dataset, n: int, seed: int, name: str) -> Subset:
    """A fixed subset of ``n`` training samples, drawn by ``seed`` and stratified by class.

    Each class's samples are shuffled by a generator seeded from ``seed``, then dealt out in
    turns, one per class, and the first ``n`` dealt are kept: the classes keep equal shares as
    far as their sizes allow, and a larger ``n`` keeps every sample of a smaller one. A data
    set whose labels are not known up front (``fake``) gets a plain seeded random subset.

    Raises:
        DataError: ``n`` is not a positive integer, or more than the training set holds.
    """
    check_subset(n)
    if n > len(dataset):
        raise data_error(f"--train-subset {n} is more than the {len(dataset)} training samples of {name}: "
                         f"pass at most {len(dataset)}, or leave it out to train on all of them")
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, 1))  # not n: a larger subset holds a smaller one
    targets = _targets(dataset)
    if targets is None:
        return Subset(dataset, sorted(torch.randperm(len(dataset), generator=generator)[:n].tolist()))
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    queues = [[members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
              for _, members in sorted(by_class.items())]
    dealt: list[int] = []
    for turn in range(max(len(q) for q in queues)):
        dealt.extend(q[turn] for q in queues if turn < len(q))
        if len(dealt) >= n:
            break
    return Subset(dataset, sorted(dealt[:n]))


# --------------------------------------------------------------------------- digits


def load_digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits as normalised tensors, split 80/20 stratified by ``seed``.

    No augmentation, whatever ``augment`` says: at 8x8 a crop or shift removes a large part of
    a stroke, and a mirrored digit is not the same digit (or is another one), so the usual
    image augmentations change labels rather than adding variety.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        index, test_size=_VAL_FRACTION, random_state=seed % 2**32, stratify=digits.target
    )
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    train_x, val_x = images[train_idx], images[val_idx]
    # Normalise with the training split's statistics only, so nothing leaks from validation.
    mean, std = train_x.mean(), train_x.std()
    train_x = (train_x - mean) / std
    val_x = (val_x - mean) / std
    return TensorDataset(train_x, labels[train_idx]), TensorDataset(val_x, labels[val_idx])


# --------------------------------------------------------------------------- fake


def load_fake() -> tuple[Dataset, Dataset]:
    """Deterministic noise images: sample ``i`` is generated from seed ``i + random_offset``."""
    from torchvision import datasets, transforms

    to_tensor = transforms.ToTensor()
    train = datasets.FakeData(size=256, image_size=(3, 32, 32), num_classes=10, transform=to_tensor, random_offset=0)
    # A disjoint offset so validation images are not copies of training images.
    val = datasets.FakeData(size=64, image_size=(3, 32, 32), num_classes=10, transform=to_tensor, random_offset=256)
    return train, val


# --------------------------------------------------------------------------- CIFAR


def _default_root() -> Path:
    """``$GRANULAR_DATA`` if set, else ``~/.cache/granular/data``."""
    env = os.environ.get("GRANULAR_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "granular" / "data"


def cifar_transforms(kind: str, augment: bool):
    """Train and validation transforms for CIFAR-10/100.

    Args:
        kind: ``"cifar10"`` or ``"cifar100"``.
        augment: Whether the training transform augments.

    Returns:
        ``(train_transform, val_transform)``.
    """
    from torchvision import transforms

    mean, std = _CIFAR_STATS[kind]
    normalize = transforms.Normalize(mean, std)
    val = transforms.Compose([transforms.ToTensor(), normalize])
    if not augment:
        return transforms.Compose([transforms.ToTensor(), normalize]), val
    # Cutout (DeVries & Taylor, 2017) as torchvision's RandomErasing: always (p=1) erase one
    # square (ratio 1) to 0, which after Normalize is the data-set mean, as in the paper's code.
    # RandomErasing's `scale` is the erased fraction of the image *area*, so on 32x32 (1024 px)
    # a 16x16 patch is 256/1024 = 0.25 and an 8x8 patch is 64/1024 = 0.0625. The paper's best
    # sizes are 16x16 for CIFAR-10 and 8x8 for CIFAR-100, which is what we use. One difference:
    # Cutout lets the patch hang over the border, RandomErasing keeps it wholly inside.
    area = 0.25 if kind == "cifar10" else 0.0625
    train = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10),
            transforms.ToTensor(),
            normalize,
            transforms.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0),
        ]
    )
    return train, val


def load_cifar(kind: str, root: str | os.PathLike | None, augment: bool) -> tuple[Dataset, Dataset, int]:
    """CIFAR-10/100 from the python version already under ``root``; never downloads."""
    from torchvision import datasets

    cls, folder, title, num_classes = {
        "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", "CIFAR-10", 10),
        "cifar100": (datasets.CIFAR100, "cifar-100-python", "CIFAR-100", 100),
    }[kind]
    base = Path(root).expanduser() if root is not None else _default_root()
    if base.name == folder:  # the user pointed at the extracted folder itself
        base = base.parent
    if not (base / folder).is_dir():
        raise data_error(
            f"{title} not found under {base}: put the python version there ({folder}) "
            f"or pass --dataset digits"
        )
    train_tf, val_tf = cifar_transforms(kind, augment)
    try:
        train = cls(str(base), train=True, transform=train_tf, download=False)
        val = cls(str(base), train=False, transform=val_tf, download=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise data_error(
            f"{title} under {base / folder} is incomplete or corrupted ({exc}): "
            f"replace it with a fresh copy of the python version or pass --dataset digits"
        ) from exc
    return train, val, num_classes


# --------------------------------------------------------------------------- imagefolder


def imagefolder_transforms(size: int, augment: bool):
    """Train and validation transforms producing ``size`` x ``size`` RGB tensors."""
    from torchvision import transforms

    normalize = transforms.Normalize(*_IMAGENET_STATS)
    # Resize the short side to size * 256/224 then center-crop, the usual ImageNet evaluation
    # recipe (256 -> 224), scaled to any size.
    resize = max(size, int(math.floor(size * 256 / 224)))
    val = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
    )
    if augment:
        train = transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
    else:
        train = val
    return train, val


def _image_folder(path: Path, transform, shown: str):
    """An ImageFolder at ``path``, with torchvision's errors turned into one-line DataErrors."""
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except FileNotFoundError as exc:
        raise data_error(
            f"no images found under {path} ({exc}): put images in one subfolder per class, "
            f"e.g. {path}/CLASS/IMAGE.png, or check the path in --dataset {shown}"
        ) from exc


def _split_indices(targets: list[int], seed: int) -> tuple[list[int], list[int]]:
    """Stratified 80/20 split of sample indices, determined by ``seed``.

    Each class with at least two images gives ``max(1, round(0.2 * n))`` of them to validation;
    a class with a single image stays in training.
    """
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, 0))
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    train, val = [], []
    for target in sorted(by_class):
        members = by_class[target]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_val = max(1, round(_VAL_FRACTION * len(members))) if len(members) >= 2 else 0
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return sorted(train), sorted(val)


def load_imagefolder(directory: str, size: int, augment: bool, seed: int) -> tuple[Dataset, Dataset, int]:
    """ImageFolder data from ``DIR/train`` + ``DIR/val``, or ``DIR`` split 80/20 by ``seed``."""
    shown = f"imagefolder:{directory}"
    path = Path(directory).expanduser()
    if not path.exists():
        raise data_error(f"data set directory {path} does not exist: pass an existing folder of class subfolders")
    if not path.is_dir():
        raise data_error(f"data set path {path} is not a directory: pass a folder of class subfolders")
    train_tf, val_tf = imagefolder_transforms(size, augment)

    has_train, has_val = (path / "train").is_dir(), (path / "val").is_dir()
    if has_train != has_val:
        present, missing = ("train", "val") if has_train else ("val", "train")
        raise data_error(
            f"{path} has {present}/ but no {missing}/: add {path / missing} with the same class "
            f"folders, or put the class folders directly in {path} to split it 80/20"
        )
    if has_train:
        train = _image_folder(path / "train", train_tf, shown)
        val = _image_folder(path / "val", val_tf, shown)
        if train.classes != val.classes:
            raise data_error(
                f"{path}/train and {path}/val have different class folders "
                f"({len(train.classes)} vs {len(val.classes)}): give both the same class subfolders"
            )
        return train, val, len(train.classes)

    # One folder: two views of it with different transforms, split by index.
    train_view = _image_folder(path, train_tf, shown)
    val_view = _image_folder(path, val_tf, shown)
    train_idx, val_idx = _split_indices(train_view.targets, seed)
    if not val_idx:
        raise data_error(
            f"{path} has too few images to split off a validation set ({len(train_view)}): "
            f"add at least two images to a class folder, or provide {path}/train and {path}/val"
        )
    return Subset(train_view, train_idx), Subset(val_view, val_idx), len(train_view.classes)
