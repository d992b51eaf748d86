"""Small image-folder trees in the layouts of tiny-ImageNet and SlimageNet64, for tests."""

import os

import numpy as np
from PIL import Image

# Created in this (unsorted) order; label i is the i-th name in sorted order.
WNIDS = ("n03", "n01", "n02")


def _write(path, rng, size=(64, 64)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def tiny_imagenet_tree(root, per_class=4, num_val=5, seed=0):
    """tiny-imagenet-200/ as distributed: train/<wnid>/images/*.JPEG (+ boxes file),
    val/images/*.JPEG with val/val_annotations.txt, wnids.txt. Returns the root."""
    rng = np.random.default_rng(seed)
    root = os.path.join(root, "tiny-imagenet-200")
    for wnid in WNIDS:
        for i in range(per_class):
            _write(os.path.join(root, "train", wnid, "images", f"{wnid}_{i}.JPEG"), rng)
        with open(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write("".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    lines = []
    for i in range(num_val):
        _write(os.path.join(root, "val", "images", f"val_{i}.JPEG"), rng)
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % len(WNIDS)]}\t0\t0\t63\t63\n")
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.writelines(lines)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("\n".join(WNIDS) + "\n")
    return root


def slimagenet_tree(root, per_class=(5, 2), seed=1):
    """SlimageNet64/ as distributed: train/<class>/<image>.png and test/<class>/<image>.png.
    Returns the root."""
    rng = np.random.default_rng(seed)
    root = os.path.join(root, "SlimageNet64")
    for split, count in zip(("train", "test"), per_class):
        for name in WNIDS:
            for i in range(count):
                _write(os.path.join(root, split, name, f"{name}_{i}.png"), rng)
    return root


def class_folders_tree(root, per_class=(10, 7, 3), size=(16, 16), seed=2):
    """ROOT/<class>/<image>.png, the README's first layout (no test split), with
    per_class[i] images of class WNIDS[i]. Returns (root, files in label order)."""
    rng = np.random.default_rng(seed)
    root = os.path.join(root, "tree")
    for name, count in zip(WNIDS, per_class):
        for i in range(count):
            _write(os.path.join(root, name, f"{name}_{i:02d}.png"), rng, size)
    files = [os.path.join(root, name, f"{name}_{i:02d}.png")
             for name, count in sorted(zip(WNIDS, per_class)) for i in range(count)]
    return root, files
