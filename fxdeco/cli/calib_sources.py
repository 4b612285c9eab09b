"""Calibration data named on the command line: an image folder, Fashion-MNIST, a text file, or ``random``.

:func:`load_calibration` returns the batches with a one-line description that
the CLI prints and stores in its report. ``random`` is Gaussian noise (images,
or float32 tensors of a given per-sample shape for models that do not take
images) or uniform token ids (text); its description says so in capitals, and
names the dtype and shape fed, because ranks chosen on noise say little about
how the model behaves on real data.

Random data for a factory model that is not an image model takes the shape of
``input_shape`` (``--input-shape``), else the shape the model declares or
implies (:attr:`BuiltModel.input_shape`). :func:`check_first_batch` runs the
first batch through the model before anything slow, so that a shape that does
not fit fails at once, naming the shape fed and the option that changes it.

Images are scaled to [0, 1], given the channels the model's first convolution
expects (grey repeated to RGB, RGB averaged to grey), resized (shorter side,
then a centre crop) to the image size, and normalised with the model's
mean/std (torchvision: ImageNet; timm: the model's ``pretrained_cfg``; a
factory model: Fashion-MNIST's own statistics for Fashion-MNIST, none for an
image folder).

Example:
    >>> import torch
    >>> from fxdeco.cli.model_specs import BuiltModel, ModelSpec
    >>> built = BuiltModel(ModelSpec("f.py:make", "file", "f.py", "make"), torch.nn.Conv2d(3, 4, 3), channels=3)
    >>> calib = load_calibration("random", built, batches=2, batch_size=4, image_size=32)
    >>> len(calib.batches), tuple(calib.batches[0].shape), calib.random
    (2, (4, 3, 32, 32), True)
    >>> calib.description
    'RANDOM DATA (Gaussian noise, not real inputs): 2 batches of 4 images 3x32x32, fed as float32 tensors of \
shape (4, 3, 32, 32)'
    >>> mlp = BuiltModel(ModelSpec("f.py:make", "file", "f.py", "make"), torch.nn.Linear(32, 4))
    >>> load_calibration("random", mlp, batches=2, batch_size=4, input_shape=(32,)).description
    'RANDOM DATA (Gaussian noise, not real inputs): 2 batches of 4 samples of shape 32 (--input-shape), fed as \
float32 tensors of shape (4, 32)'
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import pathlib
import random as pyrandom
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fxdeco.cli.model_specs import BuiltModel

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILE = "train-images-idx3-ubyte.gz"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_IMAGE_SIZE = 224
USAGE = "give an image folder, fashion-mnist[:DIR], a text file (hf: models) or random"
SHAPE_HINT = "set the shape of one random sample (no batch dimension) with --input-shape, e.g. --input-shape 32 " \
             "or --input-shape 3,224,224"


class CalibrationSourceError(ValueError):
    """A calibration source that does not exist, is empty, or does not suit the model."""


@dataclasses.dataclass
class Calibration:
    """Batches ready for ``fxdeco.transform`` and what they are."""

    source: str
    description: str
    random: bool
    batches: list[Any]
    stat_mask_fn: Callable[[Any], torch.Tensor] | None = None
    kind: str = "image"  # image, tensor (random data of a given shape) or text

    def example(self) -> Any:
        """The first batch: the example input of a model that must be captured with ``torch.export``."""
        return self.batches[0]

    @property
    def fed(self) -> str:
        """What the model is fed, batch dimension included (:func:`describe_batch` of the first batch)."""
        return describe_batch(self.example())


def _dims(shape: Any) -> str:
    return "x".join(str(d) for d in shape)


def describe_batch(batch: Any) -> str:
    """The dtype and shape of a calibration batch, for messages and reports.

    Example:
        >>> describe_batch(torch.zeros(4, 32))
        'float32 tensors of shape (4, 32)'
        >>> describe_batch({"input_ids": torch.zeros(2, 8, dtype=torch.long)})
        'input_ids: int64 tensors of shape (2, 8)'
    """
    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')} tensors of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return ", ".join(f"{key}: {describe_batch(value)}" for key, value in batch.items())
    return type(batch).__name__


def _fit_images(images: torch.Tensor, built: BuiltModel, size: int, mean: Any, std: Any) -> torch.Tensor:
    """``(N, C, H, W)`` in [0, 1] -> the model's channels, ``size`` x ``size``, normalised."""
    channels = built.channels or images.shape[1]
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 3 and channels == 1:
        images = images.mean(1, keepdim=True)
    elif images.shape[1] != channels:
        raise CalibrationSourceError(f"the model takes {channels}-channel images; the source has {images.shape[1]}")
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        resized = (max(size, round(height * scale)), max(size, round(width * scale)))
        images = F.interpolate(images, size=resized, mode="bilinear", align_corners=False, antialias=True)
        top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
        images = images[..., top:top + size, left:left + size]
    if mean is not None and std is not None:
        m = torch.tensor(mean[:1] * channels if len(mean) == 1 else mean).view(1, -1, 1, 1)
        s = torch.tensor(std[:1] * channels if len(std) == 1 else std).view(1, -1, 1, 1)
        images = (images - m) / s
    return images.contiguous()


def _batched(samples: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(samples.split(batch_size))


def _count(n: int, batches: int, batch_size: int, what: str) -> int:
    wanted = batches * batch_size
    if n < wanted:
        log.warning("%s has %d samples, fewer than --batches %d x --batch-size %d; using all of them",
                    what, n, batches, batch_size)
    return min(n, wanted)


# ----------------------------------------------------------------------------- sources


def _random_images(built: BuiltModel, batches: int, batch_size: int, size: int, generator: torch.Generator
                   ) -> Calibration:
    channels = built.channels or 3
    data = [torch.randn(batch_size, channels, size, size, generator=generator) for _ in range(batches)]
    text = f"RANDOM DATA (Gaussian noise, not real inputs): {batches} batches of {batch_size} images " \
           f"{channels}x{size}x{size}, fed as {describe_batch(data[0])}"
    return Calibration("random", text, True, data)


def _random_tensors(batches: int, batch_size: int, shape: tuple[int, ...], origin: str, generator: torch.Generator
                    ) -> Calibration:
    data = [torch.randn(batch_size, *shape, generator=generator) for _ in range(batches)]
    text = f"RANDOM DATA (Gaussian noise, not real inputs): {batches} batches of {batch_size} samples of shape " \
           f"{_dims(shape)} ({origin}), fed as {describe_batch(data[0])}"
    return Calibration("random", text, True, data, kind="tensor")


def _random_tokens(built: BuiltModel, batches: int, batch_size: int, length: int, generator: torch.Generator
                   ) -> Calibration:
    if not built.vocab_size:
        raise CalibrationSourceError(f"{built.spec.text} has no config.vocab_size to draw random token ids from")
    data = [{"input_ids": torch.randint(0, built.vocab_size, (batch_size, length), generator=generator),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long)} for _ in range(batches)]
    text = f"RANDOM DATA (uniform token ids, not real text): {batches} batches of {batch_size} sequences " \
           f"of {length} tokens, fed as {describe_batch(data[0])}"
    return Calibration("random", text, True, data, kind="text")


def _read_idx(path: pathlib.Path) -> torch.Tensor:
    """An IDX file (gzip): magic, dimension sizes (big-endian int32), then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def _fashion_mnist(folder: pathlib.Path, built: BuiltModel, batches: int, batch_size: int, size: int | None,
                   generator: torch.Generator) -> Calibration:
    file = folder / FASHION_MNIST_FILE
    if not file.is_file():
        raise CalibrationSourceError(f"{file} not found: install the Debian package dataset-fashion-mnist or give "
                                     "fashion-mnist:DIR with the IDX files")
    images = _read_idx(file)
    n = _count(len(images), batches, batch_size, "Fashion-MNIST")
    chosen = torch.randperm(len(images), generator=generator)[:n]
    pixels = images[chosen].unsqueeze(1).float().div(255)
    size = size or built.image_size or 28
    mean, std = (built.mean, built.std) if built.mean is not None else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    data = _batched(_fit_images(pixels, built, size, mean, std), batch_size)
    text = f"Fashion-MNIST training images from {folder}: {len(data)} batches of up to {batch_size}, " \
           f"resized to {size}x{size}"
    return Calibration(f"fashion-mnist:{folder}", text, False, data)


def _image_folder(folder: pathlib.Path, built: BuiltModel, batches: int, batch_size: int, size: int | None,
                  seed: int) -> Calibration:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationSourceError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pyrandom.Random(seed).shuffle(files)  # class subfolders: a sample of every class, reproducibly
    files = files[:_count(len(files), batches, batch_size, str(folder))]
    size = size or built.image_size or DEFAULT_IMAGE_SIZE
    mode = "L" if built.channels == 1 else "RGB"
    tensors = []
    for file in files:
        try:
            with Image.open(file) as image:
                pixels = pil_to_tensor(image.convert(mode)).float().div(255).unsqueeze(0)
        except OSError as exc:
            raise CalibrationSourceError(f"cannot read image {file}: {exc}") from exc
        tensors.append(_fit_images(pixels, built, size, built.mean, built.std))
    data = _batched(torch.cat(tensors), batch_size)
    text = f"{len(files)} images from {folder} in {len(data)} batches, resized to {size}x{size}"
    return Calibration(str(folder), text, False, data)


def _text_file(file: pathlib.Path, built: BuiltModel, batches: int, batch_size: int, max_length: int) -> Calibration:
    if not built.spec.takes_text:
        raise CalibrationSourceError(f"a text file calibrates hf: models; {built.spec.text} takes images: "
                                     "give an image folder, fashion-mnist or random")
    lines = [line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise CalibrationSourceError(f"{file} holds no text lines")
    lines = lines[:_count(len(lines), batches, batch_size, str(file))]
    tokenizer = tokenizer_for(built)
    data = []
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        data.append(dict(enc))
    text = f"{len(lines)} lines of {file} in {len(data)} batches (at most {max_length} tokens each)"
    return Calibration(str(file), text, False, data, stat_mask_fn=attention_mask, kind="text")


def attention_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Keep padding out of the statistics: the tokenizer's attention mask (1 = real token)."""
    return batch["attention_mask"]


def tokenizer_for(built: BuiltModel) -> Any:
    """The tokenizer saved beside an hf: model, loaded once and kept on ``built``."""
    if built.tokenizer is None:
        from transformers import AutoTokenizer

        try:
            built.tokenizer = AutoTokenizer.from_pretrained(built.spec.name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CalibrationSourceError(f"{built.spec.name} has no tokenizer files to tokenize the text with; "
                                         "save the tokenizer there (tokenizer.save_pretrained) or use --calib random"
                                         ) from exc
    return built.tokenizer


# ----------------------------------------------------------------------------- entry point


def load_calibration(source: str, built: BuiltModel, *, batches: int = 8, batch_size: int = 16,
                     image_size: int | None = None, max_length: int = 128, seed: int = 0,
                     input_shape: tuple[int, ...] | None = None) -> Calibration:
    """Read ``source`` (``random``, ``fashion-mnist[:DIR]``, an image folder or a text file) for ``built``.

    ``image_size`` defaults to the model's native size (torchvision 224, timm's
    ``pretrained_cfg``), else 28 for Fashion-MNIST and 224 otherwise.
    ``max_length`` is in tokens (text models). ``seed`` fixes random data and
    which samples are taken. ``input_shape`` (``random`` only) is the shape of
    one sample, batch dimension excluded, for models that do not take images;
    without it and without ``image_size``, random data takes
    ``built.input_shape`` when the model has one, else it is images.

    Example:
        >>> import torch
        >>> from fxdeco.cli.model_specs import BuiltModel, ModelSpec
        >>> built = BuiltModel(ModelSpec("f.py:make", "file", "f.py", "make"), torch.nn.Conv2d(1, 4, 3), channels=1)
        >>> load_calibration("/nonexistent", built)
        Traceback (most recent call last):
        ...
        fxdeco.cli.calib_sources.CalibrationSourceError: calibration source '/nonexistent' not found: give an image \
folder, fashion-mnist[:DIR], a text file (hf: models) or random
    """
    if batches < 1 or batch_size < 1:
        raise CalibrationSourceError(f"--batches and --batch-size must be at least 1, got {batches} and {batch_size}")
    if input_shape is not None:
        if source != "random":
            raise CalibrationSourceError(f"--input-shape sets the shape of random data; {source!r} brings its own "
                                         "inputs: give --calib random or drop --input-shape")
        if built.spec.takes_text:
            raise CalibrationSourceError(f"{built.spec.text} takes token ids: size its random data with --max-length, "
                                         "not --input-shape")
        if image_size is not None:
            raise CalibrationSourceError("give --input-shape or --image-size, not both")
        if not input_shape or any(d < 1 for d in input_shape):
            raise CalibrationSourceError(f"--input-shape must be positive sizes, got {_dims(input_shape) or 'none'}")
    generator = torch.Generator().manual_seed(seed)
    if source == "random":
        if built.spec.takes_text:
            return _random_tokens(built, batches, batch_size, max_length, generator)
        if input_shape is not None:
            return _random_tensors(batches, batch_size, tuple(input_shape), "--input-shape", generator)
        if image_size is not None and built.input_shape is not None and built.channels is None:
            # a Linear-first model takes vectors; images of a matching width would pass, broadcast over rows
            raise CalibrationSourceError(
                f"--image-size sizes images, but {built.spec.text} takes samples of shape {_dims(built.input_shape)} "
                f"({built.input_shape_origin or 'its first layer'}): size random data with --input-shape instead")
        if image_size is None and built.input_shape is not None:
            return _random_tensors(batches, batch_size, built.input_shape,
                                   f"{built.input_shape_origin or 'the model'}; change with --input-shape", generator)
        return _random_images(built, batches, batch_size, image_size or built.image_size or DEFAULT_IMAGE_SIZE,
                              generator)
    if built.spec.takes_text and source.startswith("fashion-mnist"):
        raise CalibrationSourceError(f"{built.spec.text} takes text: give a text file or random")
    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        folder = pathlib.Path(source.partition(":")[2] or FASHION_MNIST_DIR)
        return _fashion_mnist(folder, built, batches, batch_size, image_size, generator)
    path = pathlib.Path(source)
    if path.is_dir():
        if (path / FASHION_MNIST_FILE).is_file():
            return _fashion_mnist(path, built, batches, batch_size, image_size, generator)
        if built.spec.takes_text:
            raise CalibrationSourceError(f"{built.spec.text} takes text: give a text file or random, not a folder")
        return _image_folder(path, built, batches, batch_size, image_size, seed)
    if path.is_file():
        return _text_file(path, built, batches, batch_size, max_length)
    raise CalibrationSourceError(f"calibration source {source!r} not found: {USAGE}")


def check_first_batch(built: BuiltModel, calib: Calibration) -> None:
    """Run the first batch through the model once (no gradients): inputs that do not fit fail here, in one line.

    Otherwise a wrong input shape surfaces deep inside the decomposition, as a
    matrix or convolution shape error, after the model has been captured.

    Example:
        >>> from fxdeco.cli.model_specs import BuiltModel, ModelSpec
        >>> built = BuiltModel(ModelSpec("f.py:make", "file", "f.py", "make"), torch.nn.Linear(32, 8))
        >>> check_first_batch(built, load_calibration("random", built, batches=1, batch_size=4, input_shape=(32,)))
        >>> check_first_batch(built, load_calibration("random", built, batches=1, batch_size=4, input_shape=(16,)))
        Traceback (most recent call last):
        ...
        fxdeco.cli.calib_sources.CalibrationSourceError: the model fails on the first calibration batch, float32 \
tensors of shape (4, 16) (random data): RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x16 and 32x8); set \
the shape of one random sample (no batch dimension) with --input-shape, e.g. --input-shape 32 or --input-shape \
3,224,224
    """
    from fxdeco.batches import as_call

    args, kwargs = as_call(calib.example())
    try:
        with torch.no_grad():
            built.model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the input not fitting, or the model itself
        first = str(exc).splitlines()[0] if str(exc) else ""
        if calib.random and calib.kind != "text":
            hint = SHAPE_HINT
        elif calib.kind == "image":
            hint = "the source gives images: check --image-size, or calibrate a model that does not take images " \
                   "with --calib random --input-shape SHAPE"
        else:
            hint = "check that the model takes the tokenizer's outputs as keyword arguments"
        origin = "random data" if calib.random else calib.source
        raise CalibrationSourceError(f"the model fails on the first calibration batch, {calib.fed} ({origin}): "
                                     f"{type(exc).__name__}: {first}; {hint}") from exc


def example_batch(built: BuiltModel, info: dict[str, Any]) -> Any:
    """A small input of the recorded kind and size (``info`` from :func:`input_info`), to capture a model again.

    Example:
        >>> import torch
        >>> from fxdeco.cli.model_specs import BuiltModel, ModelSpec
        >>> built = BuiltModel(ModelSpec("f.py:make", "file", "f.py", "make"), torch.nn.Conv2d(1, 4, 3), channels=1)
        >>> tuple(example_batch(built, {"kind": "image", "shape": [1, 28, 28]}).shape)
        (2, 1, 28, 28)
        >>> example_batch(built, {"kind": "tensor", "shape": [32], "dtype": "float32"}).shape
        torch.Size([2, 32])
    """
    if info["kind"] in ("image", "tensor"):
        return torch.zeros(2, *info["shape"], dtype=getattr(torch, info.get("dtype", "float32")))
    # Two sequences of two or more tokens: torch.export would fix dimensions of size 1.
    length = max(2, int(info["length"]))
    return {key: torch.ones(2, length, dtype=torch.long) for key in info["keys"]}


def input_info(calib: Calibration) -> dict[str, Any]:
    """What the calibration inputs looked like, as JSON: enough for :func:`example_batch`.

    Example:
        >>> input_info(Calibration("random", "", True, [torch.zeros(4, 3, 8, 8)]))
        {'kind': 'image', 'shape': [3, 8, 8], 'dtype': 'float32'}
    """
    first = calib.example()
    if isinstance(first, torch.Tensor):
        return {"kind": "tensor" if calib.kind == "tensor" else "image", "shape": list(first.shape[1:]),
                "dtype": str(first.dtype).removeprefix("torch.")}
    # In the batch's order: the keyword inputs' order is the order of the graph's inputs that torch.export
    # captures, so a model captured again from example_batch() has the graph that was saved.
    return {"kind": "text", "keys": list(first), "length": int(first["input_ids"].shape[1])}
