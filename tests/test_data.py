import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.data import FASHION_MNIST_DIR, Batches, load_dataset
from autoprune.errors import UserError


def _disjoint(a, b):
    ka = {hash(x.numpy().tobytes()) for x in a.x}
    return not any(hash(x.numpy().tobytes()) in ka for x in b.x)


def test_digits_splits_deterministic(digits):
    again = load_dataset("digits")
    assert torch.equal(digits.val.x, again.val.x) and torch.equal(digits.test.y, again.test.y)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.val) == 300 and len(digits.test) == 359
    assert digits.input_shape == (1, 1, 8, 8) and digits.num_classes == 10
    assert not digits.flip  # digits are not mirror-symmetric
    assert abs(float(digits.train.x.mean())) < 1e-4  # normalised on the train part
    other_seed = load_dataset("digits", seed=1)
    assert not torch.equal(other_seed.val.y, digits.val.y)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist missing")
def test_fashion_mnist_full():
    d = load_dataset("fashion-mnist")
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.input_shape == (1, 1, 28, 28) and d.num_classes == 10
    assert torch.bincount(d.test.y).tolist() == [1000] * 10
    assert _disjoint(d.val.subset(500), d.train.subset(5000))


def _write_cifar(root: Path, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(1, 3):
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n_train, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n_train))}, f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 255, (n_test, 3072), dtype=np.uint8),
                     b"labels": list(rng.integers(0, 10, n_test))}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_cifar10_format(tmp_path):
    _write_cifar(tmp_path / "cifar")
    d = load_dataset(f"cifar10:{tmp_path / 'cifar'}", val_size=8)
    assert (len(d.train), len(d.val), len(d.test)) == (32, 8, 10)
    assert d.input_shape == (1, 3, 32, 32) and d.classes[3] == "c3" and d.flip


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert d.classes == ("cat", "dog", "eel") and d.input_shape == (1, 3, 12, 12)
    assert len(d.train) + len(d.val) + len(d.test) == 18
    (tmp_path / "imgs" / "dog" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.png"):
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}")


@pytest.mark.parametrize("spec,match", [
    ("mnist", "unknown dataset"),
    ("cifar10", "needs a folder"),
    ("fashion-mnist:/nonexistent/fm", "not found"),
    ("imagefolder:/nonexistent/x", "not found"),
])
def test_bad_specs(spec, match):
    with pytest.raises(UserError, match=match):
        load_dataset(spec)


def test_wrong_format_folders(tmp_path):
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="lacks|not a valid IDX"):
        load_dataset(f"fashion-mnist:{tmp_path / 'fm'}")
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="lacks data_batch"):
        load_dataset(f"cifar10:{tmp_path / 'c'}")


def test_batches_augment(digits):
    b = Batches(digits.train, 64, shuffle=True, augment=True, pad=1, flip=True, seed=3)
    xs = [x for x, _ in b]
    assert sum(len(x) for x in xs) == len(digits.train) and xs[0].shape == (64, 1, 8, 8)
    again = [x for x, _ in Batches(digits.train, 64, shuffle=True, augment=True, pad=1,
                                   flip=True, seed=3)]
    assert torch.equal(xs[0], again[0])  # seeded
    plain = next(iter(Batches(digits.train, 64)))[0]
    assert torch.equal(plain, digits.train.x[:64])
