"""replace_norms: which layers it converts, and that a converted model keeps its
parameters, buffers, hooks, mode and state_dict and computes the same outputs."""

import copy

import pytest
import torch

import layernorm_ext
from layernorm_ext import replace_norms

TORCH_TO_OURS = {
    torch.nn.LayerNorm: "LayerNorm",
    torch.nn.RMSNorm: "RMSNorm",
    torch.nn.BatchNorm1d: "BatchNorm1d",
    torch.nn.BatchNorm2d: "BatchNorm2d",
    torch.nn.BatchNorm3d: "BatchNorm3d",
}


class RowNormModel(torch.nn.Module):
    """LayerNorm/RMSNorm layers nested in every kind of container."""

    def __init__(self, width=24):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width))
        self.blocks = torch.nn.ModuleList(
            [
                torch.nn.Sequential(
                    torch.nn.RMSNorm(width, eps=1e-6), torch.nn.Linear(width, width)
                ),
                torch.nn.Sequential(
                    torch.nn.Sequential(torch.nn.LayerNorm(width, bias=False)), torch.nn.GELU()
                ),
            ]
        )
        self.heads = torch.nn.ModuleDict(
            {
                "rms": torch.nn.RMSNorm([4, width // 4]),
                "ln": torch.nn.LayerNorm(width, elementwise_affine=False),
            }
        )

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        shaped = self.heads["rms"](x.unflatten(-1, (4, -1))).flatten(-2)
        return self.heads["ln"](shaped)


def randomize_parameters(model):
    """Non-default weights and biases, so that a dropped or swapped parameter shows."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return model


def test_replaces_row_norms_in_nested_containers():
    model = randomize_parameters(RowNormModel())
    replaced = replace_norms(model)
    assert replaced is model
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert len(layers) == 5
    for layer in layers:
        assert type(layer) in (layernorm_ext.LayerNorm, layernorm_ext.RMSNorm), type(layer)
    assert type(model.stem[0]) is torch.nn.Linear
    assert type(model.blocks[1][1]) is torch.nn.GELU


def test_outputs_equal_and_gradients_reach_the_same_parameters():
    torch.manual_seed(0)
    model = randomize_parameters(RowNormModel()).double()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 3, 24, dtype=torch.float64)

    replace_norms(model)
    out = model(x)
    expected = reference(x)
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert ours.grad is not None, name
        torch.testing.assert_close(ours.grad, theirs.grad, msg=name)


def test_keeps_parameters_buffers_state_dict_and_optimizer():
    model = randomize_parameters(RowNormModel())
    parameters = dict(model.named_parameters())
    state_before = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    replace_norms(model)

    assert dict(model.named_parameters()).keys() == parameters.keys()
    for name, parameter in model.named_parameters():
        assert parameter is parameters[name], name
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for key, value in state_after.items():
        assert value.data_ptr() == state_before[key].data_ptr(), key

    # The optimizer built before the conversion still steps the model's weights.
    weight = model.blocks[0][0].weight
    before = weight.detach().clone()
    model(torch.randn(4, 24)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(weight, before)
    torch.testing.assert_close(weight, before - 0.1 * weight.grad)


def test_keeps_train_eval_mode_hooks_and_sharing():
    model = RowNormModel()
    model.train()
    model.blocks[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    calls = []
    model.heads["ln"].register_forward_hook(lambda module, args, output: calls.append(type(module)))
    model.shared = model.stem[1]  # one layer reachable under two names

    replace_norms(model)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.shared is model.stem[1]
    assert type(model.shared) is layernorm_ext.LayerNorm
    model(torch.randn(2, 24))
    assert calls == [layernorm_ext.LayerNorm]


def test_keeps_device_and_dtype():
    model = RowNormModel().to(torch.bfloat16)
    replace_norms(model)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16


def test_root_norm_is_converted_and_returned():
    layer = torch.nn.RMSNorm(10)
    converted = replace_norms(layer)
    assert type(converted) is layernorm_ext.RMSNorm
    assert converted.weight is layer.weight
    x = torch.randn(4, 10)
    torch.testing.assert_close(converted(x), torch.nn.functional.rms_norm(x, (10,), layer.weight))


def test_leaves_subclasses_and_our_layers_alone():
    class CustomLayerNorm(torch.nn.LayerNorm):
        def forward(self, input):
            return super().forward(input) * 2

    ours = layernorm_ext.LayerNorm(6)
    model = torch.nn.Sequential(CustomLayerNorm(6), ours, torch.nn.LayerNorm(6))
    replace_norms(model)
    assert type(model[0]) is CustomLayerNorm
    assert model[1] is ours
    assert type(model[2]) is layernorm_ext.LayerNorm


def test_our_classes_only_override_forward():
    """replace_norms swaps classes in place, which is only sound while each of
    our classes adds no state to torch's: no __init__, no new attributes."""
    for torch_class, name in TORCH_TO_OURS.items():
        ours = getattr(layernorm_ext, name)
        assert issubclass(ours, torch_class), name
        assert ours.__init__ is torch_class.__init__, name
        assert "__slots__" not in vars(ours), name


# BatchNorm: layernorm_ext.BatchNorm1d/2d/3d.


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm1d(6)
        self.body = torch.nn.Sequential(
            torch.nn.BatchNorm2d(6, momentum=0.3),
            torch.nn.ModuleList([torch.nn.BatchNorm3d(6, affine=False)]),
        )
        self.ln = torch.nn.LayerNorm(5)

    def forward(self, x):
        # x: [N, 6, 5, 5, 5]
        a = self.bn1(x.flatten(2)).view_as(x)
        b = self.body[0](a.flatten(3)).view_as(x)
        return self.ln(self.body[1][0](b))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norms_converted_with_running_stats(training):
    torch.manual_seed(1)
    model = randomize_parameters(ConvNet()).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn_like(module.running_mean))
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
    model.train(training)
    reference = copy.deepcopy(model)
    buffers = dict(model.named_buffers())

    replace_norms(model)

    assert type(model.bn1) is layernorm_ext.BatchNorm1d
    assert type(model.body[0]) is layernorm_ext.BatchNorm2d
    assert type(model.body[1][0]) is layernorm_ext.BatchNorm3d
    assert type(model.ln) is layernorm_ext.LayerNorm
    for name, buffer in model.named_buffers():
        assert buffer is buffers[name], name
    assert all(m.training is training for m in model.modules())

    x = torch.randn(4, 6, 5, 5, 5, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(model(x), reference(x))
    for (name, ours), (_, theirs) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(ours, theirs, msg=name)
    if training:
        assert int(model.bn1.num_batches_tracked) == 2


def test_sync_batch_norm_converted():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4, momentum=0.2)).double()
    randomize_parameters(model)
    reference = copy.deepcopy(model)
    weight = model[1].weight
    replace_norms(model)
    assert type(model[1]) is layernorm_ext.SyncBatchNorm
    assert model[1].weight is weight and model[1].process_group is None
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    # No process group: both compute a local BatchNorm, in training and in eval.
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))
