"""Data sets for ``granular search ... --dataset D``.

:func:`load_data` turns a data-set spec into a :class:`DataBundle`: the train and validation
sets plus what a search needs to know about them (classes, channels, input size, batch size)
and loaders whose order is a function of ``(seed, epoch)``, so a resumed run sees the same
batches as an uninterrupted one.

Specs:

* ``digits`` (the default): scikit-learn's bundled 8x8 handwritten digits, 1797 real images in
  10 classes. It is the default because it is *real* data that ships inside a package the
  project already depends on (``scikit-learn`` in the registry), so the very first command a
  user types runs offline, on any machine, in seconds, with nothing to download or put in place.
  Synthetic data (``fake``) would also run offline, but accuracy on noise means nothing, so it
  cannot show whether pruning kept the model working.
* ``cifar10`` / ``cifar100``: torchvision's CIFAR readers over the python version of the data,
  never downloaded: it must already be under ``root`` (default: ``$GRANULAR_DATA``, else
  ``~/.cache/granular/data``).
* ``imagefolder:DIR``: a folder with one subfolder per class, or ``DIR/train`` and ``DIR/val``
  each laid out that way.
* ``fake``: torchvision's deterministic ``FakeData`` noise images, for smoke tests.

Every problem with the user's input raises :class:`granular.errors.DataError` with a one-line
message that names the problem and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from granular import distributed
from granular.errors import DataError, GranularError

__all__ = ["DataBundle", "load_data", "list_datasets", "DEFAULT_DATASET"]

DEFAULT_DATASET = "digits"

_DATASETS = ("digits", "cifar10", "cifar100", "imagefolder:DIR", "fake")

# Per-channel statistics of the CIFAR training sets (pixels in [0, 1]).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# ImageNet statistics: the usual choice for photographs of unknown provenance, and what
# pretrained backbones expect.
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_VAL_FRACTION = 0.2


def _error(message: str) -> DataError:
    """Build a :class:`DataError` whose message is guaranteed to be one line."""
    return DataError(" ".join(str(message).split("\n")))


@dataclass
class DataBundle:
    """A train/validation pair and what a search needs to know about it.

    Attributes:
        name: The spec the bundle was loaded from (``"digits"``, ``"imagefolder:/data/x"``...).
        train_set: Training samples, each ``(image tensor, class index)``.
        val_set: Validation samples, same layout.
        num_classes: Number of classes.
        in_channels: Channels of an input image.
        image_size: Side of the square model input.
        batch_size: Samples per batch, for both loaders.
        seed: Seed of the split (where the bundle made one) and of the shuffling.
        num_workers: Loader worker processes; 0 loads in the calling process.
    """

    name: str
    train_set: Dataset
    val_set: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    batch_size: int
    seed: int
    num_workers: int = 0

    def train_loader(self, epoch: int, *, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        """Loader over the training set for one epoch.

        The order is shuffled by a fresh :class:`torch.Generator` seeded from ``(seed, epoch)``,
        so the same epoch always yields the same batches (a resumed run repeats the batches of
        the run it resumes) and different epochs yield different orders. With worker processes
        the workers' seeds come from the same generator, so random augmentation repeats too;
        in-process loading (``num_workers=0``) draws augmentation from torch's global RNG.
        Incomplete last batches are dropped so every step sees ``batch_size`` samples.

        Under ``torchrun`` (or with ``world_size > 1``) each process gets a disjoint shard: a
        :class:`~torch.utils.data.DistributedSampler` seeded with ``seed`` and set to ``epoch``
        permutes the set the same way on every rank, and rank ``r`` takes every
        ``world_size``-th sample from ``r``, in batches of ``batch_size / world_size``; step
        ``i``'s shards together are samples ``i * batch_size`` to ``(i + 1) * batch_size`` of
        that permutation, the global batch. ``batch_size`` stays the global batch.

        Args:
            epoch: Epoch number (any non-negative integer).
            rank: This process's rank (default: from the process group, else 0).
            world_size: Number of processes (default: from the process group, else 1).

        Returns:
            A shuffled loader with ``drop_last=True``.

        Raises:
            DataError: ``batch_size`` does not divide evenly over ``world_size`` processes.
        """
        rank, world_size = _rank_and_world(rank, world_size)
        generator = torch.Generator()
        if world_size == 1:
            generator.manual_seed(_mix_seed(self.seed, epoch))
            return DataLoader(
                self.train_set,
                batch_size=self.batch_size,
                shuffle=True,
                drop_last=True,
                generator=generator,
                num_workers=self.num_workers,
            )
        per_rank = _per_rank_batch(self.batch_size, world_size)
        sampler = DistributedSampler(self.train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        generator.manual_seed(_mix_seed(self.seed, epoch, rank))  # worker seeds: per rank, so shards differ
        return DataLoader(
            self.train_set,
            batch_size=per_rank,
            sampler=sampler,
            drop_last=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_loader(self, *, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        """Loader over the validation set, in dataset order, keeping the last partial batch.

        Under ``torchrun`` (or with ``world_size > 1``) rank ``r`` gets samples ``r``,
        ``r + world_size``, ... (no padding, no sample twice), in batches of
        ``batch_size / world_size``; add the ranks' correct and total counts to get the
        accuracy of the whole set.

        Args:
            rank: This process's rank (default: from the process group, else 0).
            world_size: Number of processes (default: from the process group, else 1).

        Returns:
            An unshuffled loader.
        """
        rank, world_size = _rank_and_world(rank, world_size)
        if world_size == 1:
            return DataLoader(
                self.val_set,
                batch_size=self.batch_size,
                shuffle=False,
                drop_last=False,
                num_workers=self.num_workers,
            )
        return DataLoader(
            Subset(self.val_set, range(rank, len(self.val_set), world_size)),
            batch_size=max(1, self.batch_size // world_size),
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
        )

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """An input of the right shape, for tracing and shape propagation.

        Args:
            batch: Batch dimension.

        Returns:
            Zeros of shape ``(batch, in_channels, image_size, image_size)``.
        """
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size)


def _mix_seed(seed: int, epoch: int, *more: int) -> int:
    """Combine a seed and an epoch (and more, e.g. a rank) into one 63-bit generator seed
    without collisions in practice."""
    entropy = [seed % 2**64, epoch % 2**64, *(m % 2**64 for m in more)]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments where given, else the process group's (0, 1 without one)."""
    world = distributed.world_size() if world_size is None else int(world_size)
    r = (distributed.rank() if world_size is None else 0) if rank is None else int(rank)
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"rank {r} is not in a world of {world} processes")
    return r, world


def _per_rank_batch(batch_size: int, world_size: int) -> int:
    """``batch_size / world_size``, or a one-line :class:`DataError` when it does not divide."""
    try:
        return distributed.per_rank_batch(batch_size, world_size)
    except GranularError as err:
        raise _error(str(err)) from None


def list_datasets() -> list[str]:
    """Names of the known data-set specs (``DIR`` stands for a folder path).

    Returns:
        The specs :func:`load_data` accepts.
    """
    return list(_DATASETS)


def load_data(
    spec: str = DEFAULT_DATASET,
    *,
    batch_size: int = 64,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    augment: bool = False,
    num_workers: int = 0,
    limit: int | None = None,
    image_size: int | None = None,
) -> DataBundle:
    """Load a data set from its spec.

    Args:
        spec: ``digits``, ``cifar10``, ``cifar100``, ``imagefolder:DIR`` or ``fake``.
        batch_size: Samples per batch.
        seed: Seed of the train/val split (digits, single-folder imagefolder) and shuffling.
        root: Where CIFAR lives; default ``$GRANULAR_DATA``, else ``~/.cache/granular/data``.
        augment: Use training augmentation (CIFAR, imagefolder; ignored for digits and fake).
        num_workers: Loader worker processes.
        limit: Keep only the first ``limit`` training samples and the first
            ``max(1, limit // 4)`` validation samples, for smoke tests.
        image_size: Square input side for ``imagefolder`` (default 224). The other data sets
            have a fixed size; passing a different one for them is an error.

    Returns:
        The loaded :class:`DataBundle`.

    Raises:
        DataError: The spec is unknown, the data is missing or malformed, or the options
            do not fit it.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise _error(f"batch size must be a positive integer, got {batch_size!r}: pass e.g. --batch-size 64")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise _error(f"num_workers must be a non-negative integer, got {num_workers!r}: pass 0 to load in-process")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise _error(f"limit must be a positive integer, got {limit!r}: pass e.g. --limit 256 or leave it out")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise _error(f"image size must be a positive integer, got {image_size!r}: pass e.g. --image-size 224")

    text = str(spec).strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()

    if kind == "imagefolder":
        if not arg.strip():
            raise _error("imagefolder needs a directory: pass --dataset imagefolder:DIR")
        size = 224 if image_size is None else image_size
        train_set, val_set, num_classes = _load_imagefolder(arg.strip(), size, augment, seed)
        name, in_channels = f"imagefolder:{arg.strip()}", 3
    elif kind in ("digits", "cifar10", "cifar100", "fake"):
        if sep:
            raise _error(f"data set {kind!r} takes no argument, got {text!r}: pass --dataset {kind}")
        native = 8 if kind == "digits" else 32
        if image_size is not None and image_size != native:
            raise _error(
                f"{kind} images are {native}x{native}, not {image_size}x{image_size}: "
                f"leave the image size out (it applies to imagefolder only)"
            )
        size, name = native, kind
        if kind == "digits":
            train_set, val_set, num_classes, in_channels = *_load_digits(seed), 10, 1
        elif kind == "fake":
            train_set, val_set, num_classes, in_channels = *_load_fake(), 10, 3
        else:
            train_set, val_set, num_classes = _load_cifar(kind, root, augment)
            in_channels = 3
    else:
        known = ", ".join(_DATASETS)
        raise _error(f"unknown data set {text!r}: pass --dataset with one of {known}")

    if limit is not None:
        train_set = Subset(train_set, range(min(limit, len(train_set))))
        val_set = Subset(val_set, range(min(max(1, limit // 4), len(val_set))))

    if len(train_set) < batch_size:
        fix = "raise --limit or lower --batch-size" if limit is not None else "lower --batch-size or add data"
        raise _error(
            f"the train set of {name} has {len(train_set)} samples, fewer than one batch of {batch_size} "
            f"(last partial batches are dropped, so no step would run): {fix}"
        )

    return DataBundle(
        name=name,
        train_set=train_set,
        val_set=val_set,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=size,
        batch_size=batch_size,
        seed=seed,
        num_workers=num_workers,
    )


# --------------------------------------------------------------------------- digits


def _load_digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
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


def _load_fake() -> tuple[Dataset, Dataset]:
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


def _cifar_transforms(kind: str, augment: bool):
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


def _load_cifar(kind: str, root: str | os.PathLike | None, augment: bool) -> tuple[Dataset, Dataset, int]:
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
        raise _error(
            f"{title} not found under {base}: put the python version there ({folder}) "
            f"or pass --dataset digits"
        )
    train_tf, val_tf = _cifar_transforms(kind, augment)
    try:
        train = cls(str(base), train=True, transform=train_tf, download=False)
        val = cls(str(base), train=False, transform=val_tf, download=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise _error(
            f"{title} under {base / folder} is incomplete or corrupted ({exc}): "
            f"replace it with a fresh copy of the python version or pass --dataset digits"
        ) from exc
    return train, val, num_classes


# --------------------------------------------------------------------------- imagefolder


def _imagefolder_transforms(size: int, augment: bool):
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
        raise _error(
            f"no images found under {path} ({exc}): put images in one subfolder per class, "
            f"e.g. {path}/CLASS/IMAGE.png, or check the path in --dataset {shown}"
        ) from exc


def _split_indices(targets: list[int], seed: int) -> tuple[list[int], list[int]]:
    """Stratified 80/20 split of sample indices, determined by ``seed``.

    Each class with at least two images gives ``max(1, round(0.2 * n))`` of them to validation;
    a class with a single image stays in training.
    """
    generator = torch.Generator()
    generator.manual_seed(_mix_seed(seed, 0))
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


def _load_imagefolder(directory: str, size: int, augment: bool, seed: int) -> tuple[Dataset, Dataset, int]:
    """ImageFolder data from ``DIR/train`` + ``DIR/val``, or ``DIR`` split 80/20 by ``seed``."""
    shown = f"imagefolder:{directory}"
    path = Path(directory).expanduser()
    if not path.exists():
        raise _error(f"data set directory {path} does not exist: pass an existing folder of class subfolders")
    if not path.is_dir():
        raise _error(f"data set path {path} is not a directory: pass a folder of class subfolders")
    train_tf, val_tf = _imagefolder_transforms(size, augment)

    has_train, has_val = (path / "train").is_dir(), (path / "val").is_dir()
    if has_train != has_val:
        present, missing = ("train", "val") if has_train else ("val", "train")
        raise _error(
            f"{path} has {present}/ but no {missing}/: add {path / missing} with the same class "
            f"folders, or put the class folders directly in {path} to split it 80/20"
        )
    if has_train:
        train = _image_folder(path / "train", train_tf, shown)
        val = _image_folder(path / "val", val_tf, shown)
        if train.classes != val.classes:
            raise _error(
                f"{path}/train and {path}/val have different class folders "
                f"({len(train.classes)} vs {len(val.classes)}): give both the same class subfolders"
            )
        return train, val, len(train.classes)

    # One folder: two views of it with different transforms, split by index.
    train_view = _image_folder(path, train_tf, shown)
    val_view = _image_folder(path, val_tf, shown)
    train_idx, val_idx = _split_indices(train_view.targets, seed)
    if not val_idx:
        raise _error(
            f"{path} has too few images to split off a validation set ({len(train_view)}): "
            f"add at least two images to a class folder, or provide {path}/train and {path}/val"
        )
    return Subset(train_view, train_idx), Subset(val_view, val_idx), len(train_view.classes)
