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
* ``fashion-mnist``: Fashion-MNIST's 60,000 training and 10,000 test images (the test set
  validates), 28x28 grey, from the gzipped idx files of the Debian package
  ``dataset-fashion-mnist`` or the same files under ``root`` / ``$GRANULAR_DATA``
  (:mod:`granular.fashion_mnist`); never downloaded.
* ``imagefolder:DIR``: a folder with one subfolder per class, or ``DIR/train`` and ``DIR/val``
  each laid out that way.
* ``fake``: torchvision's deterministic ``FakeData`` noise images, for smoke tests.

Every problem with the user's input raises :class:`granular.errors.DataError` with a one-line
message that names the problem and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from granular import distributed
from granular.datasets import (check_subset, data_error, load_cifar, load_digits, load_fake, load_imagefolder,
                               mix_seed, train_subset)
from granular.errors import GranularError

__all__ = ["DataBundle", "load_data", "list_datasets", "DEFAULT_DATASET"]

DEFAULT_DATASET = "digits"

_DATASETS = ("digits", "cifar10", "cifar100", "fashion-mnist", "imagefolder:DIR", "fake")
_NATIVE_SIZE = {"digits": 8, "fashion-mnist": 28}  # the others: 32




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
            generator.manual_seed(mix_seed(self.seed, epoch))
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
        generator.manual_seed(mix_seed(self.seed, epoch, rank))  # worker seeds: per rank, so shards differ
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
        raise data_error(str(err)) from None


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
    subset: int | None = None,
) -> DataBundle:
    """Load a data set from its spec.

    Args:
        spec: ``digits``, ``cifar10``, ``cifar100``, ``fashion-mnist``, ``imagefolder:DIR`` or ``fake``.
        batch_size: Samples per batch.
        seed: Seed of the train/val split (digits, single-folder imagefolder) and shuffling.
        root: Where CIFAR lives; default ``$GRANULAR_DATA``, else ``~/.cache/granular/data``.
            For ``fashion-mnist``: the folder of its idx files (default ``$GRANULAR_DATA``,
            then ``/usr/share/datasets/fashion-mnist``).
        augment: Use training augmentation (CIFAR, Fashion-MNIST, imagefolder; ignored for digits and fake).
        num_workers: Loader worker processes.
        limit: Keep only the first ``limit`` training samples and the first
            ``max(1, limit // 4)`` validation samples, for smoke tests.
        image_size: Square input side for ``imagefolder`` (default 224). The other data sets
            have a fixed size; passing a different one for them is an error.
        subset: Train on a fixed subset of this many training samples, drawn by ``seed``
            and stratified by class (:func:`granular.datasets.train_subset`); the validation
            set stays whole. Applied before ``limit``.

    Returns:
        The loaded :class:`DataBundle`.

    Raises:
        DataError: The spec is unknown, the data is missing or malformed, or the options
            do not fit it.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise data_error(f"batch size must be a positive integer, got {batch_size!r}: pass e.g. --batch-size 64")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise data_error(f"num_workers must be a non-negative integer, got {num_workers!r}: pass 0 to load in-process")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise data_error(f"limit must be a positive integer, got {limit!r}: pass e.g. --limit 256 or leave it out")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise data_error(f"image size must be a positive integer, got {image_size!r}: pass e.g. --image-size 224")
    if subset is not None:
        check_subset(subset)

    text = str(spec).strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()

    if kind == "imagefolder":
        if not arg.strip():
            raise data_error("imagefolder needs a directory: pass --dataset imagefolder:DIR")
        size = 224 if image_size is None else image_size
        train_set, val_set, num_classes = load_imagefolder(arg.strip(), size, augment, seed)
        name, in_channels = f"imagefolder:{arg.strip()}", 3
    elif kind in ("digits", "cifar10", "cifar100", "fashion-mnist", "fake"):
        if sep:
            raise data_error(f"data set {kind!r} takes no argument, got {text!r}: pass --dataset {kind}")
        native = _NATIVE_SIZE.get(kind, 32)
        if image_size is not None and image_size != native:
            raise data_error(
                f"{kind} images are {native}x{native}, not {image_size}x{image_size}: "
                f"leave the image size out (it applies to imagefolder only)"
            )
        size, name = native, kind
        if kind == "digits":
            train_set, val_set, num_classes, in_channels = *load_digits(seed), 10, 1
        elif kind == "fake":
            train_set, val_set, num_classes, in_channels = *load_fake(), 10, 3
        elif kind == "fashion-mnist":
            from granular.fashion_mnist import load_fashion_mnist
            train_set, val_set, num_classes, in_channels = *load_fashion_mnist(root, augment), 10, 1
        else:
            train_set, val_set, num_classes = load_cifar(kind, root, augment)
            in_channels = 3
    else:
        known = ", ".join(_DATASETS)
        raise data_error(f"unknown data set {text!r}: pass --dataset with one of {known}")

    if subset is not None:
        train_set = train_subset(train_set, subset, seed, name)
    if limit is not None:
        train_set = Subset(train_set, range(min(limit, len(train_set))))
        val_set = Subset(val_set, range(min(max(1, limit // 4), len(val_set))))

    if len(train_set) < batch_size:
        fix = "raise --limit or lower --batch-size" if limit is not None else "lower --batch-size or add data"
        raise data_error(
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
