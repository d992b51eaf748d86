"""Image-folder datasets: class-per-folder trees, prepared once into ArrayRecord files.

Layouts (`LAYOUTS`):
  "tiny_imagenet": tiny-imagenet-200/ as distributed: train/<wnid>/images/*.JPEG is the
    "train" split; val/images/* labelled by val/val_annotations.txt (file, wnid, box) is
    the "test" split (tiny-ImageNet's own test images carry no labels).
  "slimagenet64": SlimageNet64/ as distributed: train/<class>/<image> and
    test/<class>/<image>.
  "class_folders": any tree; split s is ROOT/s/<class>/<image>, and where ROOT has no
    folder s, the split "train" is ROOT/<class>/<image>.
Classes are the sorted folder names of the train split (torchvision's ImageFolder order);
label i is the i-th of them in every split.

`prepare_split` checks that every image decodes (naming the file that does not) and
writes the original encoded bytes with their labels into one ArrayRecord file per split
(with a progress bar), reused while the tree keeps the same files. `FolderSource` reads
it by index, decoding and, where the stored size differs, resizing on the calling thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct

import numpy as np
import tqdm
from absl import logging
from PIL import Image

from rr_jax.errors import DatasetContentError, DatasetNotFoundError

LAYOUTS = ("tiny_imagenet", "slimagenet64", "class_folders")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp")

# layout -> (what to download and where, published number of classes or None)
_DISTRIBUTIONS = {
    "tiny_imagenet": (
        "Download tiny-ImageNet (http://cs231n.stanford.edu/tiny-imagenet-200.zip), unzip it and "
        "pass the extracted tiny-imagenet-200/ directory as --config.image_folder=PATH.",
        200,
    ),
    "slimagenet64": (
        "Download SlimageNet64 (Antoniou et al. 2020, distributed on Zenodo, record 3672132), "
        "extract it and pass the SlimageNet64/ directory (holding train/ and test/) as "
        "--config.image_folder=PATH.",
        1000,
    ),
    "class_folders": ("Pass a directory ROOT/<class>/<image> (or ROOT/<split>/<class>/<image>) "
                      "as --config.image_folder=PATH.", None),
}
_LABEL = struct.Struct("<i")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown image-folder layout {layout!r}; valid: {list(LAYOUTS)}.")


def how_to_get(layout: str) -> str:
    """What to download for a layout and how to hand it over."""
    _check_layout(layout)
    return _DISTRIBUTIONS[layout][0]


def _missing(root: str, layout: str, what: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"{what} not found under image_folder={root!r} ({layout} layout). " + how_to_get(layout))


def _images_in(directory: str) -> list[str]:
    return sorted(
        entry.path for entry in os.scandir(directory)
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _class_root(root: str, layout: str, split: str) -> str:
    """The folder holding one sub-folder per class of `split` (not for tiny-ImageNet's test)."""
    if layout == "class_folders" and split == "train" and not os.path.isdir(os.path.join(root, "train")):
        return root
    return os.path.join(root, split)


def has_split(root: str, layout: str, split: str) -> bool:
    """Whether the tree has `split` where the layout looks for it (its folder; for
    tiny-ImageNet's test split, val/val_annotations.txt); reads no images."""
    _check_layout(layout)
    if layout == "tiny_imagenet" and split == "test":
        return os.path.isfile(os.path.join(root, "val", "val_annotations.txt"))
    return os.path.isdir(_class_root(root, layout, split))


def class_names(root: str, layout: str) -> list[str]:
    """The class names of the tree (sorted folder names of its train split), which is
    label order; logs a warning where their number differs from the published one."""
    _check_layout(layout)
    train = _class_root(root, layout, "train")
    if not os.path.isdir(train):
        raise _missing(root, layout, f"The train split folder {train!r} was")
    names = sorted(entry.name for entry in os.scandir(train) if entry.is_dir())
    if not names:
        raise _missing(root, layout, f"No class folders in {train!r} were")
    published = _DISTRIBUTIONS[layout][1]
    if published is not None and len(names) != published:
        logging.warning("%s holds %d classes, the published %s has %d.", train, len(names), layout, published)
    return names


def list_split(root: str, layout: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """The image files of `split`, their labels and the class names, in a fixed order.

    Returns:
      files (sorted by class, then file name; tiny-ImageNet's test split in the order of
      val_annotations.txt), labels int32[N] and the class names.
    """
    names = class_names(root, layout)
    index = {name: i for i, name in enumerate(names)}
    files, labels = [], []
    if layout == "tiny_imagenet" and split == "test":
        annotations = os.path.join(root, "val", "val_annotations.txt")
        if not os.path.isfile(annotations):
            raise _missing(root, layout, f"The test split's labels {annotations!r} were")
        with open(annotations) as f:
            for line_number, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 2 or fields[1] not in index:
                    raise DatasetContentError(f"{annotations}:{line_number}: expected 'FILE WNID ...' with a WNID of "
                                     f"train/, got {line.strip()!r}.")
                files.append(os.path.join(root, "val", "images", fields[0]))
                labels.append(index[fields[1]])
    else:
        if layout != "class_folders" and split not in ("train", "test"):
            raise DatasetNotFoundError(f"Unknown split {split!r} of the {layout} layout; valid: ['train', 'test'].")
        split_root = _class_root(root, layout, split)
        if not os.path.isdir(split_root):
            raise _missing(root, layout, f"The {split!r} split folder {split_root!r} was")
        for entry in sorted(os.scandir(split_root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            if entry.name not in index:
                raise DatasetContentError(f"Class folder {entry.path!r} has no counterpart in the train split; "
                                 f"classes: the {len(names)} folders of the train split.")
            images = entry.path
            if layout == "tiny_imagenet":
                images = os.path.join(images, "images")
            found = _images_in(images) if os.path.isdir(images) else []
            files += found
            labels += [index[entry.name]] * len(found)
    if not files:
        raise _missing(root, layout, f"Images of split {split!r} were")
    return files, np.asarray(labels, np.int32), names


def decode_image(data: bytes, shape: tuple[int, int, int], name: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8[H, W, C] of `shape` (C = 1 grey or 3 RGB).

    An image of another size is resized so that its shorter side is the target's, then
    centre-cropped (bilinear, antialiased); ValueError naming `name` if it does not decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if shape[2] == 1 else "RGB")
            return fit_image(image, shape)
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetContentError(f"Cannot decode {name}: {error}. Replace or remove the file.") from error


def fit_image(image: Image.Image | np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """An image resized (shorter side to the target's, bilinear, antialiased) and
    centre-cropped to `shape` (H, W, C); returned unchanged where it already fits."""
    if isinstance(image, np.ndarray):
        if image.shape == tuple(shape):
            return image
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    height, width = shape[:2]
    if image.size != (width, height):
        scale = max(height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, np.uint8).reshape(shape)


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    """One split prepared into ArrayRecord: its file, size, class names and the label of
    every record (int32[num_examples], in record order)."""

    path: str
    num_examples: int
    class_names: tuple[str, ...]
    labels: np.ndarray = dataclasses.field(compare=False, repr=False)


def prepare_split(root: str, layout: str, split: str, cache_dir: str) -> PreparedSplit:
    """Writes `split` of the tree under `root` into an ArrayRecord file in `cache_dir`,
    or reuses the one written before for the same tree (same files and classes).

    Each record is a little-endian int32 label followed by the image file's bytes.

    Raises:
      DatasetNotFoundError: the split's folder (or images) are missing.
      DatasetContentError (a ValueError): a file does not decode (named), or a class
        folder has no counterpart in the train split.
    """
    files, labels, names = list_split(root, layout, split)
    digest = hashlib.sha1("\n".join([layout, *names, *files]).encode()).hexdigest()[:16]
    tag = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:10]
    directory = os.path.join(cache_dir, "image_folders", f"{os.path.basename(os.path.normpath(root))}-{tag}")
    path = os.path.join(directory, f"{split}.array_record")
    meta_path = os.path.join(directory, f"{split}.json")
    prepared = PreparedSplit(path, len(files), tuple(names), labels)
    if os.path.isfile(meta_path) and os.path.isfile(path):
        with open(meta_path) as f:
            if json.load(f).get("digest") == digest:
                logging.info("Image folder %s split %r: %d images of %d classes, prepared before in %s.",
                             root, split, len(files), len(names), path)
                return prepared
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.incomplete-{os.getpid()}"
    from array_record.python import array_record_module  # preparing and reading only: describing a tree needs none

    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
        for file, label in zip(tqdm.tqdm(files, desc=f"Preparing {layout} {split}", unit="img"), labels):
            with open(file, "rb") as f:
                data = f.read()
            _verify(data, file)
            writer.write(_LABEL.pack(int(label)) + data)
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            writer.close()
            os.remove(tmp)
    with open(meta_path, "w") as f:
        json.dump({"root": os.path.abspath(root), "layout": layout, "split": split, "digest": digest,
                   "num_examples": len(files), "class_names": names}, f)
    logging.info("Prepared image folder %s split %r: %d images of %d classes into %s.",
                 root, split, len(files), len(names), path)
    return prepared


def _verify(data: bytes, name: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetContentError(f"Cannot decode image file {name}: {error}. Replace or remove the file.") from error


class FolderSource:
    """Random access to a prepared split: `source[i]` -> {"image": uint8[H, W, C] of
    `image_shape`, "label": int32}, decoded (and resized where needed) on the calling
    thread. Safe to call from several threads."""

    def __init__(self, prepared: PreparedSplit, image_shape: tuple[int, int, int]):
        from array_record.python import array_record_data_source

        self._records = array_record_data_source.ArrayRecordDataSource([prepared.path])
        self._shape = tuple(image_shape)
        self._path = prepared.path
        if len(self._records) != prepared.num_examples:
            raise DatasetContentError(f"{prepared.path} holds {len(self._records)} records, expected "
                             f"{prepared.num_examples}; delete it to prepare it again.")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._records[index]
        (label,) = _LABEL.unpack_from(record)
        image = decode_image(record[_LABEL.size:], self._shape, f"record {index} of {self._path}")
        return {"image": image, "label": np.int32(label)}
