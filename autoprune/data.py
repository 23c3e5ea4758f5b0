"""Datasets held in memory as tensors, with deterministic train / val / test splits.

``--data`` takes one of::

    fashion-mnist[:DIR]   IDX .gz files (default DIR /usr/share/datasets/fashion-mnist)
    digits                scikit-learn's bundled 8x8 digits
    cifar10:DIR           the standard python pickle batches (data_batch_1..5, test_batch)
    imagefolder:DIR       one subfolder per class (or DIR/train + DIR/test), read with PIL

val is held out of the training split with a seeded permutation: it is what the search sees;
test is only for final reports.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "digits", "cifar10", "imagefolder")
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Split:
    """Images as float tensors (N, C, H, W), normalised, and int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int) -> Split:
        return Split(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class Dataset:
    spec: str
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving for this data
    pad: int  # random-crop padding used for augmentation

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def input_size(self) -> int:
        return self.train.x.shape[2]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, *self.train.x.shape[1:])


def parse_spec(spec: str) -> tuple[str, str | None]:
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name not in DATASETS:
        raise UserError(f"unknown dataset {spec!r}; use one of fashion-mnist[:DIR], digits, "
                        "cifar10:DIR, imagefolder:DIR")
    if name in ("cifar10", "imagefolder") and not arg:
        raise UserError(f"`--data {name}` needs a folder: `--data {name}:DIR`")
    return name, (arg or None)


def load_dataset(spec: str, *, val_size: int | None = None, seed: int = 0) -> Dataset:
    """Load ``spec`` into memory and split it deterministically (the same seed, the same split)."""
    name, arg = parse_spec(spec)
    if name == "fashion-mnist":
        (xtr, ytr), (xte, yte), classes = _fashion_mnist(Path(arg or FASHION_MNIST_DIR))
        flip, pad, default_val = True, 2, 5000
    elif name == "digits":
        (xtr, ytr), (xte, yte), classes = _digits(seed)
        flip, pad, default_val = False, 1, 300
    elif name == "cifar10":
        (xtr, ytr), (xte, yte), classes = _cifar10(Path(arg))
        flip, pad, default_val = True, 4, 5000
    else:
        (xtr, ytr), (xte, yte), classes = _imagefolder(Path(arg), seed)
        flip, pad = True, max(1, xtr.shape[2] // 8)
        default_val = max(1, len(ytr) // 10)
    n_val = default_val if val_size is None else val_size
    if not 0 < n_val < len(ytr):
        raise UserError(f"`val_size` must be in (0, {len(ytr)}) for {spec!r}, got {n_val}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(ytr)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    xtr = torch.from_numpy(xtr).float().div_(255.0)
    xte = torch.from_numpy(xte).float().div_(255.0)
    train_x = xtr[train_idx]
    # Normalisation statistics come from the training part only, so val/test never leak in.
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)

    def norm(x):
        return (x - mean[None, :, None, None]) / std[None, :, None, None]

    ytr_t, yte_t = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
    return Dataset(
        spec=spec, name=name,
        train=Split(norm(train_x), ytr_t[train_idx]),
        val=Split(norm(xtr[val_idx]), ytr_t[val_idx]),
        test=Split(norm(xte), yte_t),
        num_classes=len(classes), classes=tuple(classes),
        mean=tuple(mean.tolist()), std=tuple(std.tolist()), flip=flip, pad=pad,
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        magic, = struct.unpack(">I", data[:4])
        ndim = magic & 0xFF
        if magic >> 8 != 0x08 or not 1 <= ndim <= 3:
            raise ValueError(f"bad magic number {magic:#x}")
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
        return arr.reshape(dims)
    except (OSError, ValueError, EOFError, struct.error) as e:
        raise UserError(f"{str(path)!r} is not a valid IDX file ({e}); expected the original "
                        "Fashion-MNIST *-idx?-ubyte.gz files") from e


def _fashion_mnist(root: Path):
    names = {"xtr": "train-images-idx3-ubyte", "ytr": "train-labels-idx1-ubyte",
             "xte": "t10k-images-idx3-ubyte", "yte": "t10k-labels-idx1-ubyte"}
    if not root.is_dir():
        hint = (" (install it with `apt-get install -y dataset-fashion-mnist`)"
                if str(root) == FASHION_MNIST_DIR else "")
        raise UserError(f"Fashion-MNIST folder {str(root)!r} not found{hint}; expected "
                        "train-images-idx3-ubyte.gz and friends")
    arrays = {}
    for key, stem in names.items():
        for cand in (root / f"{stem}.gz", root / stem):
            if cand.is_file():
                arrays[key] = _read_idx(cand)
                break
        else:
            raise UserError(f"Fashion-MNIST folder {str(root)!r} lacks {stem}.gz; expected the "
                            "four IDX files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte"
                            ".gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz")
    for split in ("tr", "te"):
        if len(arrays["x" + split]) != len(arrays["y" + split]) or arrays["x" + split].ndim != 3:
            raise UserError(f"Fashion-MNIST folder {str(root)!r} has image/label files that do "
                            "not match; re-install the original files")
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
    return ((arrays["xtr"][:, None], arrays["ytr"]), (arrays["xte"][:, None], arrays["yte"]),
            classes)


def _digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16; scale to 0..255 so every dataset shares one code path.
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed + 1).permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te]), tuple(str(i) for i in range(10))


def _unpickle(path: Path):
    try:
        with open(path, "rb") as f:
            # The CIFAR-10 python batches are pickles of plain dicts of numpy arrays/lists.
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise UserError(f"{str(path)!r} is not a CIFAR-10 python batch ({type(e).__name__}); "
                        "expected the files of cifar-10-python.tar.gz") from e


def _cifar10(root: Path):
    if not root.is_dir():
        raise UserError(f"CIFAR-10 folder {str(root)!r} not found; expected a folder with "
                        "data_batch_1..5 and test_batch (cifar-10-batches-py)")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files or not (root / "test_batch").is_file():
        raise UserError(f"CIFAR-10 folder {str(root)!r} lacks data_batch_* or test_batch; "
                        "expected the extracted cifar-10-batches-py folder")

    def read(files):
        xs, ys = [], []
        for f in files:
            d = _unpickle(f)
            try:
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"], dtype=np.int64))
            except (KeyError, ValueError) as e:
                raise UserError(f"{str(f)!r} lacks CIFAR-10 keys b'data'/b'labels' or has the "
                                "wrong shape; expected 3x32x32 images") from e
        return np.concatenate(xs), np.concatenate(ys)

    classes = tuple(str(i) for i in range(10))
    meta = root / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta).get(b"label_names")
        if names:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return read(train_files), read([root / "test_batch"]), classes


def _read_class_folders(root: Path, classes: list[str] | None = None):
    from PIL import Image, UnidentifiedImageError

    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels, size, mode = [], [], None, None
    for label, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXT) \
            if folder.is_dir() else []
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    if mode is None:
                        # All grayscale -> one channel; anything else is read as RGB.
                        mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                        size = im.size
                    im = im.convert(mode)
                    if im.size != size:
                        im = im.resize(size, Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"image {str(f)!r} cannot be read ({e}); remove it or "
                                "replace it with a valid image") from e
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    return images, labels, classes


def _imagefolder(root: Path, seed: int):
    if not root.is_dir():
        raise UserError(f"image folder {str(root)!r} not found; expected DIR/<class>/<image> "
                        "(or DIR/train/<class>/... and DIR/test/<class>/...)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        xtr, ytr, _ = _read_class_folders(root / "train", classes)
        xte, yte, _ = _read_class_folders(root / "test", classes)
    else:
        xs, ys, classes = _read_class_folders(root)
        xtr = xte = None
    if len(classes) < 2:
        raise UserError(f"image folder {str(root)!r} has {len(classes)} class subfolder(s); "
                        "expected at least two: DIR/<class>/<image>")
    if xtr is None:
        if len(ys) < 10:
            raise UserError(f"image folder {str(root)!r} has {len(ys)} images; at least 10 "
                            "are needed to split train/val/test")
        perm = np.random.default_rng(seed + 1).permutation(len(ys))
        n_test = max(1, len(ys) // 10)
        sel = lambda idx: (np.stack([xs[i] for i in idx]), np.array([ys[i] for i in idx]))  # noqa: E731
        return sel(perm[n_test:]), sel(perm[:n_test]), classes
    if not xtr or not xte:
        raise UserError(f"image folder {str(root)!r}: train/ or test/ holds no images; "
                        "expected train/<class>/<image> and test/<class>/<image>")
    shapes = {x.shape for x in xtr + xte}
    if len(shapes) > 1:
        raise UserError(f"image folder {str(root)!r}: train/ and test/ images differ in size or "
                        f"channels ({sorted(shapes)}); make them the same")
    return ((np.stack(xtr), np.array(ytr)), (np.stack(xte), np.array(yte)), classes)


class Batches:
    """Iterate ``(x, y)`` mini-batches of a ``Split``; with ``augment`` it applies random crops
    (zero padding) and, where the data allows, horizontal flips, seeded per epoch."""

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False,
                 augment: bool = False, pad: int = 0, flip: bool = False, seed: int = 0):
        if batch_size < 1:
            raise UserError(f"`--batch-size` must be >= 1, got {batch_size}")
        self.split, self.batch_size = split, batch_size
        self.shuffle, self.augment, self.pad, self.flip = shuffle, augment, pad, flip
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        n = len(self.split)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            x, y = self.split.x[idx], self.split.y[idx]
            if self.augment:
                x = self._augment(x, g)
            yield x, y

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            offs = torch.randint(0, 2 * p + 1, (n, 2), generator=g)
            # Gather each sample's crop window with one advanced-indexing call.
            rows = (offs[:, 0, None] + torch.arange(h))[:, None, :, None]
            cols = (offs[:, 1, None] + torch.arange(w))[:, None, None, :]
            batch = torch.arange(n)[:, None, None, None]
            chans = torch.arange(x.shape[1])[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x
