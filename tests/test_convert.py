"""PyTorch <-> rr_jax checkpoints: forward parity with the official architectures,
exact round trips, and errors that list every mismatch.

The PyTorch modules below are written from the official code's layer names and
hyper-parameters (backbones/conv4.py, backbones/resnet_small.py, backbones/resnet_large.py
= torchvision's ResNet without fc, methods/relationnet.py), so their ``state_dict()`` keys
are those of the released checkpoints.
"""

import collections
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rr_jax import convert
from rr_jax.backbones import create_backbone
from rr_jax.checkpoint import Checkpointer
from rr_jax.errors import InputFileError
from rr_jax.evaluation_inputs import restore_backbone
from rr_jax.relational import RelationHead, init_relation_head

# name -> (blocks per stage, widths, ImageNet stem); conv4 is separate.
RESNETS = {
    "resnet8": ((1, 1, 1), (16, 32, 64), False),
    "resnet20": ((3, 3, 3), (16, 32, 64), False),
    "resnet32": ((5, 5, 5), (16, 32, 64), False),
    "resnet56": ((9, 9, 9), (16, 32, 64), False),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), True),
    "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512), True),
}


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'rr_jax[torch]')")


def official_backbone(torch, name):
    """A PyTorch backbone with the official architecture and parameter names."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self, blocks, widths, imagenet_stem):
            super().__init__()
            if imagenet_stem:
                self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
                self.maxpool = nn.MaxPool2d(3, 2, 1)
            else:
                self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
                self.maxpool = nn.Identity()
            self.bn1 = nn.BatchNorm2d(widths[0])
            cin = widths[0]
            self.stages = []
            for s, (count, width) in enumerate(zip(blocks, widths)):
                stage = nn.Sequential(
                    *[BasicBlock(cin if b == 0 else width, width, 2 if s and not b else 1)
                      for b in range(count)]
                )
                setattr(self, f"layer{s + 1}", stage)
                self.stages.append(stage)
                cin = width

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            for stage in self.stages:
                x = stage(x)
            return x.mean(dim=(2, 3))

    if name != "conv4":
        return ResNet(*RESNETS[name])
    layers = collections.OrderedDict()
    for i, (cin, cout) in enumerate(zip((3, 8, 16, 32), (8, 16, 32, 64)), start=1):
        layers[f"layer{i}"] = nn.Sequential(collections.OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(),
            pool=nn.AvgPool2d(2, 2) if i < 4 else nn.AdaptiveAvgPool2d(1),
        ))
    layers["flatten"] = nn.Flatten()
    return nn.Sequential(layers)


def official_head(torch, dim):
    """methods/relationnet.py's relation head for 'cat' aggregation of D = `dim`."""
    nn = torch.nn
    return nn.Sequential(collections.OrderedDict(
        linear1=nn.Linear(2 * dim, 256), bn1=nn.BatchNorm1d(256), relu=nn.LeakyReLU(),
        linear2=nn.Linear(256, 1),
    ))


def randomise(torch, module, seed):
    """Random weights and non-trivial BatchNorm statistics, weights scaled so that
    activations stay O(1) through deep networks; returns the module in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) / fan_in**0.5)
                if sub.bias is not None:
                    sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
            elif isinstance(sub, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                shape = sub.weight.shape
                sub.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                sub.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                sub.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                sub.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (), generator=generator)))
    return module.eval()


def save_official(torch, path, backbone, head=None, legacy=False):
    """The official Model.save: torch.save({'backbone', 'relation', 'optimizer'});
    `legacy`: in the pre-zip format of PyTorch < 1.6, which the paper's code ran on."""
    params = list(backbone.parameters()) + (list(head.parameters()) if head else [])
    payload = {"backbone": backbone.state_dict(),
               "optimizer": torch.optim.Adam(params, lr=1e-3).state_dict()}
    if head is not None:
        payload["relation"] = head.state_dict()
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)


def assert_close(actual, expected):
    """Agreement to 1e-4 relative to the largest magnitude of the reference."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["conv4", *RESNETS])
def test_converted_backbone_reproduces_pytorch_features(torch, tmp_path, name):
    model = randomise(torch, official_backbone(torch, name), seed=len(name))
    save_official(torch, tmp_path / "official.tar", model)
    convert.from_torch(str(tmp_path / "official.tar"), str(tmp_path / "run"), name)

    restored = restore_backbone(str(tmp_path / "run"))  # as the probe
    backbone, variables, config, step = restored.backbone, restored.variables, restored.config, restored.step
    assert (config["dataset"], config["model"]["backbone"], step) == ("cifar10", name, 0)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    features = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(variables, images)
    with torch.no_grad():
        expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert features.shape == expected.shape
    assert_close(features, expected)


def test_relation_head_converts_both_ways_and_scores_like_pytorch(torch, tmp_path):
    backbone = randomise(torch, official_backbone(torch, "conv4"), seed=1)
    head = randomise(torch, official_head(torch, 64), seed=2)
    save_official(torch, tmp_path / "official.tar", backbone, head)
    convert.from_torch(str(tmp_path / "official.tar"), str(tmp_path / "run"), "conv4")

    variables = Checkpointer(str(tmp_path / "run")).restore_head()
    pairs = np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32)
    logits = RelationHead(64).apply(variables, jnp.asarray(pairs), train=False)
    with torch.no_grad():
        expected = head(torch.from_numpy(pairs))[:, 0].numpy()
    assert_close(logits, expected)

    # The essential script's index names carry the same tensors.
    essential = convert.head_to_torch(variables, layout="essential")
    assert sorted(essential) == sorted(k.replace("linear1", "0").replace("bn1", "1")
                                       .replace("linear2", "3") for k in head.state_dict())
    reread = convert.head_from_torch(essential, 64)
    jax.tree.map(np.testing.assert_array_equal, reread, variables)


@pytest.mark.parametrize("name, legacy", [("resnet8", True), ("resnet18", False)])
def test_from_torch_then_to_torch_reproduces_every_tensor(torch, tmp_path, name, legacy):
    model = randomise(torch, official_backbone(torch, name), seed=3)
    head = randomise(torch, official_head(torch, RESNETS[name][1][-1]), seed=4)
    save_official(torch, tmp_path / "official.tar", model, head, legacy)
    for argv in (
        ["from-torch", str(tmp_path / "official.tar"), f"--backbone={name}",
         f"--workdir={tmp_path / 'run'}", "--dataset=cifar100"],
        ["to-torch", f"--workdir={tmp_path / 'run'}", str(tmp_path / "back.tar")],
    ):
        convert.main(convert.parse_flags(["rr_jax.convert", *argv]))

    back = torch.load(tmp_path / "back.tar", weights_only=True)
    assert sorted(back) == ["backbone", "relation"]
    for part, original in (("backbone", model.state_dict()), ("relation", head.state_dict())):
        assert sorted(back[part]) == sorted(original), part
        for key, tensor in original.items():
            assert back[part][key].dtype == tensor.dtype, key
            if not key.endswith("num_batches_tracked"):  # the counter is not kept
                assert torch.equal(back[part][key], tensor), key
    # The official classes accept it strictly.
    official_backbone(torch, name).load_state_dict(back["backbone"])
    official_head(torch, RESNETS[name][1][-1]).load_state_dict(back["relation"])
    _, config = Checkpointer(str(tmp_path / "run")).restore_backbone()
    assert config["dataset"] == "cifar100"


def test_to_torch_takes_the_head_out_of_a_pretraining_state(torch, tmp_path):
    backbone, head = random_variables("conv4"), random_head(64)
    state = {"step": np.int32(7),
             "params": {"backbone": backbone["params"], "head": head["params"]},
             "batch_stats": {"backbone": backbone["batch_stats"], "head": head["batch_stats"]}}
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(7, state, backbone, {"model": {"backbone": "conv4"}})
    checkpointer.wait()
    convert.to_torch(str(tmp_path), str(tmp_path / "out.tar"))

    back = torch.load(tmp_path / "out.tar", weights_only=True)
    np.testing.assert_array_equal(back["relation"]["linear1.weight"].numpy(),
                                  head["params"]["hidden"]["kernel"].T)
    np.testing.assert_array_equal(back["relation"]["bn1.running_var"].numpy(),
                                  head["batch_stats"]["norm"]["var"])
    np.testing.assert_array_equal(back["backbone"]["layer3.conv.weight"].numpy(),
                                  backbone["params"]["layer3"]["conv"]["kernel"].transpose(3, 2, 0, 1))


# ------------------------------------------------------------ without PyTorch


def _random(template, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype), template)


def random_variables(name, seed=0):
    """Variables of backbone `name` with random values, without compiling anything."""
    model = create_backbone(name)
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    return _random(template, seed)


def random_head(dim, seed=0):
    return _random(jax.eval_shape(lambda: init_relation_head(jax.random.key(0), dim)), seed)


def test_mapping_round_trip_is_exact_and_transposes_kernels():
    variables = random_variables("resnet8")
    state_dict = convert.backbone_to_torch(variables)
    kernel = variables["params"]["layer2_0"]["downsample_conv"]["kernel"]  # [1, 1, 16, 32]
    np.testing.assert_array_equal(state_dict["layer2.0.downsample.0.weight"],
                                  kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state_dict["layer3.0.downsample.1.running_mean"],
                                  variables["batch_stats"]["layer3_0"]["downsample_bn"]["mean"])
    assert state_dict["bn1.num_batches_tracked"].dtype == np.int64
    # 1 stem + 3 blocks x 2 + 2 downsample convs, and as many BatchNorms with 5 entries each
    assert len(state_dict) == 9 + 9 * 5
    jax.tree.map(np.testing.assert_array_equal,
                 convert.backbone_from_torch(state_dict, "resnet8"), variables)


@pytest.mark.parametrize(
    "edit, listed",
    [
        (lambda sd: [sd.pop(k) for k in ("layer3.0.conv2.weight", "bn1.running_mean")],
         ["missing keys (2): bn1.running_mean, layer3.0.conv2.weight"]),
        (lambda sd: sd.update({"fc.weight": np.zeros((10, 64)), "fc.bias": np.zeros(10)}),
         ["unexpected keys (2): fc.bias, fc.weight"]),
        (lambda sd: sd.update({"conv1.weight": np.zeros((16, 3, 5, 5))}),
         ["shape mismatches (1): conv1.weight: (16, 3, 5, 5) in the file, (16, 3, 3, 3) expected"]),
        (lambda sd: (sd.pop("layer1.0.bn2.weight"), sd.update({"extra": np.zeros(1)}),
                     sd.update({"layer2.0.bn1.bias": np.zeros(3)})),
         ["missing keys (1): layer1.0.bn2.weight", "unexpected keys (1): extra",
          "shape mismatches (1): layer2.0.bn1.bias: (3,) in the file, (32,) expected"]),
    ],
    ids=["missing", "unexpected", "shape", "all-at-once"],
)
def test_mismatched_state_dict_is_rejected_with_every_problem_listed(edit, listed):
    state_dict = convert.backbone_to_torch(random_variables("resnet8"))
    edit(state_dict)
    with pytest.raises(ValueError, match="backbone 'resnet8'") as error:
        convert.backbone_from_torch(state_dict, "resnet8")
    lines = str(error.value).splitlines()[1:]
    assert [line.strip() for line in lines] == listed


def test_counter_is_optional_but_other_names_are_not_guessed():
    state_dict = convert.backbone_to_torch(random_variables("conv4"))
    convert.backbone_from_torch(  # PyTorch < 0.4.1 wrote no counter
        {k: v for k, v in state_dict.items() if "num_batches" not in k}, "conv4"
    )
    with pytest.raises(ValueError, match="missing keys \\(20\\)"):
        convert.backbone_from_torch(convert.backbone_to_torch(random_variables("resnet8")), "conv4")


def test_head_with_another_aggregation_is_a_shape_error():
    head = convert.head_to_torch(random_head(64))
    with pytest.raises(ValueError, match=r"linear1.weight: \(256, 128\) in the file, \(256, 64\)"):
        convert.head_from_torch(head, 64, aggregation="sum")


def test_bad_names_are_value_errors():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet99'"):
        convert.backbone_from_torch({}, "resnet99")
    with pytest.raises(ValueError, match="Unknown head layout 'torchvision'"):
        convert.head_to_torch(random_head(8), layout="torchvision")


def test_torch_is_imported_lazily_and_its_absence_explained(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    importlib.reload(convert)
    with pytest.raises(ImportError, match=r"pip install 'rr_jax\[torch\]'"):
        convert.load_torch_checkpoint(str(tmp_path / "missing.tar"))


@pytest.mark.parametrize("content", [b"just some text\n", bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8))])
def test_files_that_are_not_pytorch_checkpoints_are_named(torch, tmp_path, content):
    path = tmp_path / "weights.tar"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=rf"{path} is not a PyTorch checkpoint of the official code") as error:
        convert.load_torch_checkpoint(str(path))
    assert "weights_only" not in str(error.value)
