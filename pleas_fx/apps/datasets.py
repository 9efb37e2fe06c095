"""Calibration and evaluation data from files, for the command line.

``open_data(spec, ...)`` accepts

* an image folder: either the ImageFolder layout (one subfolder per class, labels are the
  sorted subfolder names' indices) or a flat folder of images (no labels). Images are
  converted to RGB (or grey for ``channels=1``), their shorter side resized to ``image_size``,
  centre-cropped to ``image_size`` x ``image_size`` and normalised with ``mean`` / ``std``
  (ImageNet's by default). Hidden files (starting with ".") are ignored; any other file that
  is not an image is an error;
* a tensor file: ``.pt`` / ``.pth`` (read with ``weights_only=True``) holding an input tensor,
  an ``(inputs, labels)`` pair or a dict with ``inputs``/``x`` and ``labels``/``y``; ``.npy``
  (an input array) or ``.npz`` (arrays ``x``/``inputs`` and optionally ``y``/``labels``),
  read without pickle. Tensors are used as they are (float64 becomes float32);
* ``generated`` (see the CLI: the data-free mode, no file).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pleas_fx.core.errors import DataError

log = logging.getLogger("pleas_fx")

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "DataSource", "open_data", "default_norm"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_norm(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std, for 3 channels; their averages repeated for other counts."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,) * channels, (sum(IMAGENET_STD) / 3,) * channels


class _Batches:
    """A re-iterable sequence of batches with a length (for progress bars)."""

    def __init__(self, source: "DataSource", batch_size: int, max_batches: int | None, labels: bool):
        self.source, self.batch_size, self.labels = source, batch_size, labels
        n = -(-len(source.order) // batch_size)
        self.n = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        for i in range(self.n):
            idx = self.source.order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.source.inputs_at(idx)
            yield (x, self.source.labels_at(idx)) if self.labels else x


@dataclass
class DataSource:
    """Inputs (and labels, if the source has them) from a folder or a tensor file."""

    description: str
    num_samples: int
    has_labels: bool
    files: list[Path] = field(default_factory=list)
    file_labels: list[int] = field(default_factory=list)
    tensor: torch.Tensor | None = None
    label_tensor: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    image_size: int = 224
    channels: int = 3
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    order: list[int] = field(default_factory=list)

    def shuffled(self, seed: int) -> "DataSource":
        rng = np.random.RandomState(seed)
        self.order = [int(i) for i in rng.permutation(self.num_samples)]
        return self

    def batches(self, batch_size: int, max_batches: int | None = None, labels: bool = False) -> _Batches:
        if labels and not self.has_labels:
            raise DataError(f"{self.description} has no labels")
        return _Batches(self, batch_size, max_batches, labels)

    def inputs_at(self, idx: Sequence[int]) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[list(idx)]
        return torch.stack([self._image(self.files[i]) for i in idx])

    def labels_at(self, idx: Sequence[int]) -> torch.Tensor:
        if self.label_tensor is not None:
            return self.label_tensor[list(idx)]
        return torch.tensor([self.file_labels[i] for i in idx], dtype=torch.int64)

    def _image(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                w, h = img.size
                scale = self.image_size / min(w, h)
                if (w, h) != (self.image_size, self.image_size):
                    nw, nh = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
                    img = img.resize((nw, nh), Image.BILINEAR)
                    left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
                    img = img.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] != self.channels:
            arr = np.repeat(arr[:, :, :1], self.channels, axis=2)
        t = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        mean = torch.tensor(list(self.mean), dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(list(self.std), dtype=torch.float32).view(-1, 1, 1)
        return (t - mean) / std


def _visible(entries) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def _check_images(files: list[Path], folder: Path) -> None:
    bad = [f for f in files if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"image folder {folder} holds files that are not images: "
                        f"{', '.join(str(b.relative_to(folder)) for b in bad[:3])}{more} "
                        f"(images end in {', '.join(IMAGE_EXTENSIONS)})")


def _image_folder(folder: Path, image_size: int, channels: int, mean, std) -> DataSource:
    entries = _visible(folder.iterdir())
    if not entries:
        raise DataError(f"image folder {folder} is empty")
    dirs = [e for e in entries if e.is_dir()]
    if dirs and len(dirs) != len(entries):
        loose = next(e for e in entries if not e.is_dir())
        raise DataError(f"image folder {folder} mixes class subfolders ({dirs[0].name}/) and loose files ({loose.name}); "
                        "use one subfolder per class, or a flat folder of images")
    common = dict(image_size=image_size, channels=channels, mean=tuple(mean), std=tuple(std))
    if not dirs:
        _check_images(entries, folder)
        return DataSource(f"image folder {folder} ({len(entries)} images, no labels)", len(entries), False,
                          files=entries, order=list(range(len(entries))), **common)
    files, labels = [], []
    for label, d in enumerate(dirs):
        found = []
        for root, subdirs, names in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            found += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
        _check_images(found, folder)
        if not found:
            raise DataError(f"class folder {d} holds no images")
        files += found
        labels += [label] * len(found)
    return DataSource(f"image folder {folder} ({len(files)} images in {len(dirs)} classes)", len(files), True,
                      files=files, file_labels=labels, classes=[d.name for d in dirs],
                      order=list(range(len(files))), **common)


def _pick(mapping, names: Sequence[str]):
    for n in names:
        if n in mapping:
            return mapping[n]
    return None


def _tensor_file(path: Path) -> DataSource:
    suffix = path.suffix.lower()
    x = y = None
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = np.load(str(path), allow_pickle=False)
        else:
            with np.load(str(path), allow_pickle=False) as npz:
                obj = {k: npz[k] for k in npz.files}
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise DataError(f"cannot read data file {path}: {type(exc).__name__}: {first[0] if first else ''}") from exc
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
        x, y = obj[0], (obj[1] if len(obj) == 2 else None)
    elif isinstance(obj, dict):
        x, y = _pick(obj, ("inputs", "x", "images", "data")), _pick(obj, ("labels", "y", "targets"))
        if x is None:
            raise DataError(f"data file {path} holds a dict without an 'inputs' or 'x' entry (keys: {sorted(obj)[:6]})")
    else:
        x = obj
    try:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y) if y is not None else None
    except Exception as exc:
        raise DataError(f"data file {path}: inputs are not a tensor or array ({type(exc).__name__})") from exc
    if x.dim() < 2 or x.shape[0] == 0:
        raise DataError(f"data file {path}: inputs must be a (samples, ...) tensor, got shape {tuple(x.shape)}")
    if x.dtype == torch.float64:
        x = x.float()
    if y is not None:
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"data file {path}: labels must be {x.shape[0]} integers, got {y.dtype} of shape {tuple(y.shape)}")
        y = y.long()
    return DataSource(f"{path} ({x.shape[0]} samples of shape {tuple(x.shape[1:])}{', labelled' if y is not None else ''})",
                      int(x.shape[0]), y is not None, tensor=x, label_tensor=y, order=list(range(int(x.shape[0]))))


def open_data(spec: str | Path, *, image_size: int = 224, channels: int = 3,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> DataSource:
    """The data named by `spec`: an image folder or a tensor file (see the module docstring)."""
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    dmean, dstd = default_norm(channels)
    mean, std = tuple(mean or dmean), tuple(std or dstd)
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"--mean and --std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise DataError("--std values must be positive")
    if path.is_dir():
        return _image_folder(path, image_size, channels, mean, std)
    if path.suffix.lower() in TENSOR_SUFFIXES:
        return _tensor_file(path)
    raise DataError(f"data {path}: expected an image folder, a tensor file ({', '.join(TENSOR_SUFFIXES)}) or 'generated'")
