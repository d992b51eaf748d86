"""Conversion between the official PyTorch checkpoints and our Orbax checkpoints.

    python -m rr_jax.convert from-torch CHECKPOINT.tar --backbone=resnet56 \\
        --workdir=DIR [--dataset=cifar10] [--aggregation=cat]
    python -m rr_jax.convert to-torch --workdir=DIR OUT.tar [--step=N] \\
        [--head_layout=relationnet]

The official code saves ``torch.save({'backbone': state_dict, 'relation': state_dict,
'optimizer': ...})``. `from-torch` maps every backbone tensor (and the relation head's,
when present) onto our Flax variables and writes step 0 of an Orbax checkpoint that
``rr_jax.linear_probe`` reads like one of ours; the optimizer state is not converted.
`to-torch` writes the official layout back, which the official classes load with
``load_state_dict``.

Names: our modules mirror PyTorch's (``layer2_0/downsample_conv`` is
``layer2.0.downsample.0``). Conv kernels HWIO <-> OIHW, Dense kernels [in, out] <->
Linear weights [out, in], BatchNorm scale/bias/mean/var <-> weight/bias/running_mean/
running_var; ``num_batches_tracked`` is read and dropped (written back as 0). Every
tensor must be consumed and every variable filled: missing or unexpected names and shape
mismatches are all listed in one ValueError, never a partial load.

The mapping functions work on NumPy state dicts and need no PyTorch; only reading and
writing ``.tar`` files does (``pip install 'rr_jax[torch]'``), imported on first use.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from absl.flags import argparse_flags
from flax import traverse_util

from rr_jax.backbones import BACKBONES, create_backbone
from rr_jax.checkpoint import Checkpointer, checkpoint_dir
from rr_jax.config import base_config
from rr_jax.datasets import DATASETS, get_dataset_spec
from rr_jax.errors import InputFileError, exit_cleanly_on_known_errors
from rr_jax.relational import AGGREGATIONS, init_relation_head

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]

HEAD_LAYOUTS: Mapping[str, Mapping[str, str]] = {
    # methods/relationnet.py: Sequential(OrderedDict(linear1, bn1, relu, linear2)).
    "relationnet": {"hidden": "linear1", "norm": "bn1", "output": "linear2"},
    # essential_script.py: Sequential(Linear, BatchNorm1d, LeakyReLU, Linear).
    "essential": {"hidden": "0", "norm": "1", "output": "3"},
}
"""Relation-head layout name -> our module name -> PyTorch module name."""

_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_BACKBONE_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_COUNTER = "num_batches_tracked"


def _backbone_module(name: str) -> str:
    """Our backbone module name -> PyTorch's: layer1_0 -> layer1.0, downsample_bn -> downsample.1."""
    return _BACKBONE_MODULES.get(name, name.replace("_", "."))


def _head_module(layout: str) -> Callable[[str], str]:
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"Unknown head layout {layout!r}; valid: {sorted(HEAD_LAYOUTS)}.")
    return HEAD_LAYOUTS[layout].__getitem__


# Kernel axes as PyTorch orders them: conv HWIO -> OIHW, dense [in, out] -> [out, in].
_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def _torch_shape(leaf: str, shape: Sequence[int]) -> tuple[int, ...]:
    if leaf != "kernel":
        return tuple(shape)
    return tuple(shape[axis] for axis in _TORCH_AXES[len(shape)])


def _to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(_TORCH_AXES[x.ndim]) if leaf == "kernel" else x)


def _from_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    return x.transpose(np.argsort(_TORCH_AXES[x.ndim])) if leaf == "kernel" else x


def _torch_names(variables: Any, rename: Callable[[str], str]) -> dict[tuple[str, ...], str]:
    """Flat variable path (collection, module..., leaf) -> PyTorch state-dict key."""
    names = {}
    for path in traverse_util.flatten_dict(variables):
        *modules, leaf = path[1:]
        if leaf not in _LEAF_NAMES:
            raise ValueError(f"Variable {'/'.join(path)} has no PyTorch counterpart.")
        names[path] = ".".join([*map(rename, modules), _LEAF_NAMES[leaf]])
    return names


def _to_state_dict(variables: Variables, rename: Callable[[str], str]) -> StateDict:
    flat = traverse_util.flatten_dict(variables)
    state_dict = {}
    for path, key in _torch_names(variables, rename).items():
        state_dict[key] = _to_torch_layout(path[-1], np.asarray(flat[path]))
        if path[-1] == "var":  # BatchNorm's batch counter follows its statistics
            state_dict[key.removesuffix("running_var") + _COUNTER] = np.zeros((), np.int64)
    return state_dict


def _from_state_dict(
    state_dict: Mapping[str, Any],
    template: Variables,
    rename: Callable[[str], str],
    description: str,
) -> Variables:
    """Fills every leaf of `template` (arrays or ShapeDtypeStructs) from `state_dict`."""
    flat = traverse_util.flatten_dict(template)
    names = _torch_names(template, rename)
    expected = {key: _torch_shape(path[-1], flat[path].shape) for path, key in names.items()}
    counters = {
        key.removesuffix("running_var") + _COUNTER for key in expected if key.endswith("running_var")
    }
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - counters)
    mismatched = [
        f"{key}: {tuple(np.shape(state_dict[key]))} in the file, {shape} expected"
        for key, shape in expected.items()
        if key in state_dict and tuple(np.shape(state_dict[key])) != shape
    ]
    problems = [
        f"{title} ({len(items)}): " + ", ".join(items)
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"The state dict does not match {description}; nothing was loaded.\n  "
            + "\n  ".join(problems)
        )
    filled = {}
    for path, key in names.items():
        value = np.asarray(state_dict[key], dtype=flat[path].dtype)
        filled[path] = _from_torch_layout(path[-1], value)
    return traverse_util.unflatten_dict(filled)


def _backbone_template(name: str, image_shape: Sequence[int]) -> tuple[Variables, int]:
    """Shapes of the variables of backbone `name` for images [H, W, C], and its feature size."""
    module = create_backbone(name)
    images = jnp.zeros((1, *image_shape), jnp.float32)
    template = jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))
    features = jax.eval_shape(lambda v: module.apply(v, images, train=False), template)
    return template, features.shape[-1]


def backbone_to_torch(variables: Variables) -> StateDict:
    """Backbone variables {'params', 'batch_stats'} -> the official PyTorch state dict.

    Conv kernels [H, W, I, O] become weights [O, I, H, W]; each BatchNorm gets a
    ``num_batches_tracked`` of 0 (int64, shape []).
    """
    return _to_state_dict(variables, _backbone_module)


def backbone_from_torch(
    state_dict: Mapping[str, Any], name: str, image_shape: Sequence[int] = (32, 32, 3)
) -> Variables:
    """Official backbone state dict (NumPy arrays) -> our variables of backbone `name`.

    Args:
      state_dict: PyTorch names -> arrays, e.g. ``checkpoint['backbone']`` as NumPy.
      name: a key of BACKBONES ('conv4', 'resnet8/20/32/56', 'resnet18/34').
      image_shape: (H, W, C) of the images; only C changes a shape.
    Raises:
      ValueError listing every missing key, unexpected key and shape mismatch.
    """
    template, _ = _backbone_template(name, image_shape)
    return _from_state_dict(state_dict, template, _backbone_module, f"backbone {name!r}")


def head_to_torch(variables: Variables, layout: str = "relationnet") -> StateDict:
    """Relation-head variables -> the official head's state dict.

    layout: 'relationnet' (keys linear1.*, bn1.*, linear2.*; methods/relationnet.py) or
    'essential' (keys 0.*, 1.*, 3.*; essential_script.py).
    """
    return _to_state_dict(variables, _head_module(layout))


def head_from_torch(
    state_dict: Mapping[str, Any],
    embedding_dim: int,
    *,
    aggregation: str = "cat",
    hidden_dim: int = 256,
) -> Variables:
    """Official relation-head state dict (either layout, detected) -> RelationHead variables.

    Args:
      state_dict: e.g. ``checkpoint['relation']`` as NumPy; Linear(D', hidden) ->
        BatchNorm1d(hidden) -> LeakyReLU -> Linear(hidden, 1), D' = 2D for 'cat'.
      embedding_dim: D, the backbone's feature size.
      aggregation: the aggregation the head was trained with.
    Raises:
      ValueError listing every missing key, unexpected key and shape mismatch.
    """
    layout = "essential" if "0.weight" in state_dict else "relationnet"
    template = jax.eval_shape(
        lambda: init_relation_head(
            jax.random.key(0), embedding_dim, aggregation=aggregation, hidden_dim=hidden_dim
        )
    )
    description = (
        f"a {layout!r} relation head for {embedding_dim}-dimensional embeddings with "
        f"aggregation={aggregation!r} and hidden_dim={hidden_dim}"
    )
    return _from_state_dict(state_dict, template, _head_module(layout), description)


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "PyTorch is needed to read and write .tar checkpoints: "
            "pip install 'rr_jax[torch]' (or pip install torch)."
        ) from error
    return torch


def load_torch_checkpoint(path: str) -> dict[str, StateDict]:
    """{'backbone': ..., 'relation': ... if present} of an official ``torch.save`` file,
    as NumPy arrays; loaded with ``weights_only=True`` (no code from the file runs)."""
    torch = _import_torch()
    if not os.path.isfile(path):
        raise InputFileError(f"{path} does not exist or is not a file.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign bytes
        raise InputFileError(
            f"{path} is not a PyTorch checkpoint of the official code (torch.load could not "
            f"read it: {type(error).__name__}). Give the .tar file the official training "
            "script saved."
        ) from None
    if not isinstance(payload, dict) or "backbone" not in payload:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise InputFileError(
            f"{path} is not a checkpoint of the official code: expected a dict with a "
            f"'backbone' state dict (and optionally 'relation'), found {found}."
        )
    ignored = sorted(set(payload) - {"backbone", "relation"})
    if ignored:
        logging.info("Not converted from %s: %s.", path, ", ".join(ignored))
    return {
        part: {key: tensor.detach().cpu().numpy() for key, tensor in payload[part].items()}
        for part in ("backbone", "relation")
        if part in payload
    }


def save_torch_checkpoint(path: str, parts: Mapping[str, StateDict]) -> None:
    """``torch.save`` of {'backbone': state dict, 'relation': ...} with NumPy turned into tensors."""
    torch = _import_torch()
    torch.save(
        {
            part: {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in sd.items()}
            for part, sd in parts.items()
        },
        path,
    )


def from_torch(
    checkpoint: str,
    workdir: str,
    backbone: str,
    *,
    dataset: str = "cifar10",
    aggregation: str = "cat",
) -> None:
    """Converts an official checkpoint into step 0 of an Orbax checkpoint in `workdir`.

    Writes the backbone variables, the relation head's (when the file has one) and a
    config (``base_config()`` with `dataset`, `backbone` and `aggregation` set) that the
    linear probe reads. Refuses a workdir that already holds checkpoints.
    """
    spec = get_dataset_spec(dataset)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; valid: {list(AGGREGATIONS)}.")
    if os.path.isdir(checkpoint_dir(workdir)) and os.listdir(checkpoint_dir(workdir)):
        raise FileExistsError(
            f"{checkpoint_dir(workdir)} is not empty; convert into a new --workdir."
        )
    parts = load_torch_checkpoint(checkpoint)
    variables = backbone_from_torch(parts["backbone"], backbone, spec.image_shape)
    config = base_config()
    config.dataset = dataset
    config.model.backbone = backbone
    config.relational.aggregation = aggregation
    head = None
    if "relation" in parts:
        _, dim = _backbone_template(backbone, spec.image_shape)
        head = head_from_torch(
            parts["relation"], dim, aggregation=aggregation, hidden_dim=config.relational.hidden_dim
        )
    checkpointer = Checkpointer(workdir)
    checkpointer.save_weights(0, variables, config.to_dict(), head=head)
    checkpointer.wait()
    checkpointer.close()


def to_torch(
    workdir: str, out: str, *, step: int | None = None, head_layout: str = "relationnet"
) -> None:
    """Writes the backbone (and relation head, when the checkpoint has one) of `step`
    (default: the latest) of `workdir` as an official ``torch.save`` file `out`."""
    _head_module(head_layout)  # validate before any work
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"No checkpoints under {checkpoint_dir(workdir)}.")
    checkpointer = Checkpointer(workdir)
    variables, _ = checkpointer.restore_backbone(step)
    head = checkpointer.restore_head(step)
    checkpointer.close()
    parts = {"backbone": backbone_to_torch(variables)}
    if head is not None:
        parts["relation"] = head_to_torch(head, head_layout)
    save_torch_checkpoint(out, parts)


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """Command line (argv[0] is the program) -> the chosen command and its options."""
    parser = argparse_flags.ArgumentParser(
        description="Convert between official PyTorch checkpoints and rr_jax checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    read = commands.add_parser("from-torch", help="official .tar -> Orbax checkpoint")
    read.add_argument("checkpoint", help="file written by the official code's torch.save")
    read.add_argument("--backbone", required=True, choices=sorted(BACKBONES))
    read.add_argument("--workdir", required=True, help="new directory for the checkpoint")
    read.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    read.add_argument("--aggregation", default="cat", choices=AGGREGATIONS)
    write = commands.add_parser("to-torch", help="Orbax checkpoint -> official .tar")
    write.add_argument("out", help="file to write")
    write.add_argument("--workdir", required=True)
    write.add_argument("--step", type=int, default=None, help="default: the latest")
    write.add_argument("--head_layout", default="relationnet", choices=sorted(HEAD_LAYOUTS))
    return parser.parse_args(argv[1:])


@exit_cleanly_on_known_errors
def main(args: argparse.Namespace) -> None:
    """Runs the command chosen on the command line (see `parse_flags`)."""
    if args.command == "from-torch":
        from_torch(
            args.checkpoint, args.workdir, args.backbone,
            dataset=args.dataset, aggregation=args.aggregation,
        )
        logging.info("Wrote %s; evaluate it with python -m rr_jax.linear_probe --workdir=%s",
                     checkpoint_dir(args.workdir), args.workdir)
    else:
        to_torch(args.workdir, args.out, step=args.step, head_layout=args.head_layout)
        logging.info("Wrote %s.", args.out)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
