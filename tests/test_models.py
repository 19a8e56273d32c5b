"""The model registry, PreActResNet-18 and the Keras benchmark CNN: shapes, structure, and that
one optimiser step lowers the loss under every mixup mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kmnist_torch.models.preact_resnet import PreActResNet
from kmnist_torch.models.registry import create_model, list_models
from kmnist_torch.models.simple_cnn import SimpleCNN
from kmnist_torch.training import mixup

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_registry_lists_and_builds_by_name():
    assert list_models() == ["preact18", "simple_cnn"]
    assert isinstance(create_model("preact18", 10), PreActResNet)
    assert isinstance(create_model("simple_cnn", 49), SimpleCNN)


def test_registry_errors_name_what_exists():
    with pytest.raises(
        ValueError, match=r"unknown model 'resnet50'; available: preact18, simple_cnn"
    ):
        create_model("resnet50", 10)
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        create_model("preact18", 0)
    with pytest.raises(ValueError, match="at least 6x6"):
        create_model("simple_cnn", 10, img_size=4)


@pytest.mark.parametrize("name", ["preact18", "simple_cnn"])
@pytest.mark.parametrize("size", [28, 64])
def test_output_shapes(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=49, in_chans=1, img_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 1, size, size))
    assert out.shape == (3, 49) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_three_channel_input():
    model = create_model("preact18", 10, in_chans=3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 28, 28)).shape == (2, 10)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_preact18_has_the_reference_structure():
    model = create_model("preact18", 10)
    # Stem: one 3x3 stride-1 conv, no BN or ReLU of its own (the first block's BN follows).
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.bias is None
    first = model.layer1[0]
    assert isinstance(first.bn1, nn.BatchNorm2d) and first.bn1.num_features == 64
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert [s[-1].conv2.out_channels for s in stages] == [64, 128, 256, 512]
    assert [s[0].conv1.stride for s in stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    # Projection shortcuts exactly where channels or stride change.
    assert [s[0].shortcut is not None for s in stages] == [False, True, True, True]
    assert model.linear.in_features == 512 and model.linear.out_features == 10
    # The reference PreActResNet18 (3-channel CIFAR stem) has 11,171,146 parameters; a
    # one-channel stem has 2 x 64 x 3 x 3 fewer.
    assert _count(create_model("preact18", 10, in_chans=3)) == 11_171_146
    assert _count(model) == 11_171_146 - 2 * 64 * 9


def test_simple_cnn_matches_the_keras_benchmark():
    model = create_model("simple_cnn", 10)
    # Keras' model.summary() of mnist_cnn: 320 + 18,496 + 1,179,776 + 1,290 parameters.
    assert _count(model) == 1_199_882
    assert model.drop1.p == 0.25 and model.drop2.p == 0.5
    assert model.conv1.padding == (0, 0)  # Keras "valid" convolutions
    # Keras initialisation: zero biases, Glorot-uniform kernels (bound sqrt(6 / fan_in+fan_out)).
    assert all(float(m.bias.detach().abs().max()) == 0 for m in (model.conv1, model.fc1, model.fc2))
    bound = (6 / (9216 + 128)) ** 0.5
    assert float(model.fc1.weight.detach().abs().max()) <= bound
    assert float(model.fc1.weight.detach().abs().max()) > 0.9 * bound
    assert create_model("simple_cnn", 10, img_size=64).fc1.in_features == 64 * 30 * 30


@pytest.mark.parametrize("name", ["preact18", "simple_cnn"])
@pytest.mark.parametrize("mode,layer", [("none", None), ("input", 0), ("manifold", 1),
                                        ("manifold", 2)])  # fmt: skip
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(name, mode, layer, loss):
    torch.manual_seed(0)
    model = create_model(name, 10).train()
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 10
    plan = (
        None
        if mode == "none"
        else mixup.MixPlan(0.7, torch.tensor([3, 2, 1, 0, 7, 6, 5, 4]), layer)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def batch_loss() -> torch.Tensor:
        # Same dropout masks for both evaluations, so only the step changes the loss.
        with torch.random.fork_rng():
            torch.manual_seed(1)
            logits, soft = mixup.mixed_forward(model, x, y, 10, plan)
        return mixup.loss_fn(logits, soft, loss)

    before = batch_loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = batch_loss()
    assert float(after) < float(before.detach())


def test_bad_mix_layer_is_refused():
    model = create_model("simple_cnn", 10)
    with pytest.raises(ValueError, match=r"mix_layer must be one of \(0, 1, 2\), got 3"):
        model(torch.rand(2, 1, 28, 28), mix_layer=3, lam=0.5, perm=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="needs both lam and perm"):
        model(torch.rand(2, 1, 28, 28), mix_layer=0)


def test_load_model_refuses_files_no_run_wrote(tmp_path):
    # A model.pt without the sha256 of its weights, or a checkpoint without the model's
    # metadata, is not what a run writes: a clear error, not a guess.
    from kmnist_torch.errors import ModelFileError
    from kmnist_torch.models.modelfile import load_model, model_meta, save_model

    args = {"num_classes": 10, "in_chans": 1, "img_size": 28}
    model = create_model("simple_cnn", **args)
    meta = model_meta("simple_cnn", args, "kmnist", list("おきすつなはまやれを"))
    save_model(tmp_path / "model.pt", model, meta)
    assert load_model(tmp_path / "model.pt").meta["classes"] == meta["classes"]
    doc = torch.load(tmp_path / "model.pt", weights_only=True)
    del doc["weights_sha256"]
    torch.save(doc, tmp_path / "unsigned.pt")
    with pytest.raises(ModelFileError, match="records no sha256 of its weights"):
        load_model(tmp_path / "unsigned.pt")
    checkpoint = {"config": {"dataset": "kmnist", "model": "simple_cnn"}, "model_meta": meta,
                  "model": model.state_dict()}  # fmt: skip
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert load_model(tmp_path / "checkpoint.pt").meta["arch"] == "simple_cnn"
    torch.save({**checkpoint, "model_meta": None}, tmp_path / "checkpoint.pt")
    with pytest.raises(ModelFileError, match="kept no model metadata"):
        load_model(tmp_path / "checkpoint.pt")
