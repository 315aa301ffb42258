"""replace_norms on the norm classes of Hugging Face transformers and timm
models: the registry against the installed transformers' code, each family's
outputs and gradients against the original class's in every dtype
combination, whole models built from configs (training steps, running
statistics, checkpoints both ways, pickling, torch.compile), and the classes
it must leave alone.

transformers and timm are test-only dependencies (requirements-models.txt):
without them these tests skip, saying so.
"""

import ast
import copy
import hashlib
import importlib
import io
import logging
import pathlib

import pytest
import torch

from layernorm_ext import model_norms, replace_norms
from model_zoo import import_timm, import_transformers

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# (input dtype, weight dtype): each model's own dtype, and the mixes of a
# float32 weight with half input (autocast-style) and the reverse.
DTYPE_PAIRS = [
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
    ("float64", "float64"),
    ("bfloat16", "float32"),
    ("float32", "bfloat16"),
]

# A class of each family whose code is the family's reference: every listed
# class's code must be one of these (the weight_in_float32 family writes the
# same product two ways).
REFERENCES = {
    "llama": ["llama.LlamaRMSNorm"],
    "gemma": ["gemma.GemmaRMSNorm"],
    "t5": ["t5.T5LayerNorm"],
    "weight_in_float32": ["gpt_oss.GptOssRMSNorm", "helium.HeliumRMSNorm"],
}
# The classes the tests run, beyond the references: the models people run.
RUN = {
    "llama": [
        "qwen2.Qwen2RMSNorm",
        "qwen3.Qwen3RMSNorm",
        "mistral.MistralRMSNorm",
        "phi3.Phi3RMSNorm",
    ],
    "gemma": ["gemma2.Gemma2RMSNorm", "gemma3.Gemma3RMSNorm", "qwen3_next.Qwen3NextRMSNorm"],
    "t5": ["mt5.MT5LayerNorm"],
    "weight_in_float32": ["olmo2.Olmo2RMSNorm"],
}


def transformers_class(entry):
    folder, name = entry.split(".")
    module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    return getattr(module, name)


def family(name):
    return next(f for f in model_norms.FAMILIES if f.name == name)


# --- the registry ------------------------------------------------------------


def code_signature(tree_class):
    """What a norm class computes, from its source: its bases, its methods'
    argument names and statements (docstrings dropped), the class's own name
    replaced so that copies under other names compare equal."""

    def method(name):
        node = next(
            (n for n in tree_class.body if isinstance(n, ast.FunctionDef) and n.name == name), None
        )
        if node is None:
            return ""
        body = [
            s
            for s in node.body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        ]
        return repr([a.arg for a in node.args.args]) + "\n".join(ast.unparse(s) for s in body)

    text = "|".join(
        [",".join(ast.unparse(b) for b in tree_class.bases)]
        + [method(m) for m in ("__init__", "forward", "_norm")]
    )
    return hashlib.sha1(text.replace(tree_class.name, "X").encode()).hexdigest()


def transformers_norm_classes():
    """{'folder.Class': signature} for every *Norm* class of the installed
    transformers' modeling files, read without importing them."""
    transformers = import_transformers()
    root = pathlib.Path(transformers.__file__).parent / "models"
    found = {}
    for path in sorted(root.glob("*/modeling_*.py")):
        if path.stem != f"modeling_{path.parent.name}":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and "Norm" in node.name:
                found[f"{path.parent.name}.{node.name}"] = code_signature(node)
    return found


# The transformers version whose classes model_norms.py lists (and
# requirements-models.txt installs).
LISTED_VERSION = "5.25.0"


def test_every_listed_class_has_its_familys_code():
    installed = transformers_norm_classes()
    exact_version = import_transformers().__version__ == LISTED_VERSION
    for name, references in REFERENCES.items():
        reference_codes = {installed[r] for r in references}
        for module, cls in family(name).classes:
            entry = f"{module.split('.')[2]}.{cls}"
            if entry in installed or exact_version:
                assert installed.get(entry) in reference_codes, f"{name}: {entry} has other code"


def test_the_registry_lists_every_class_with_a_familys_code():
    transformers = import_transformers()
    if transformers.__version__ != LISTED_VERSION:
        here = transformers.__version__
        pytest.skip(f"the registry lists transformers {LISTED_VERSION}'s classes, not {here}'s")
    installed = transformers_norm_classes()
    for name, references in REFERENCES.items():
        listed = {f"{m.split('.')[2]}.{c}" for m, c in family(name).classes}
        reference_codes = {installed[r] for r in references}
        missing = sorted(
            c for c, code in installed.items() if code in reference_codes and c not in listed
        )
        assert not missing, f"{name}: same code as the family's, but not listed: {missing}"


def test_registered_class_names_are_unique():
    names = [name for f in model_norms.FAMILIES for _, name in f.classes]
    assert len(names) == len(set(names))


# --- each family against its original ----------------------------------------


def ulp_distance(ours, reference, compute_dtype):
    """|ours - reference| in units of compute_dtype's spacing at the reference."""
    reference = reference.to(compute_dtype)
    spacing = torch.nextafter(reference.abs(), torch.tensor(float("inf"), dtype=compute_dtype))
    spacing = (spacing - reference.abs()).double()
    return (ours.double() - reference.double()).abs() / spacing


def random_layer(cls, hidden, weight_dtype, centre):
    torch.manual_seed(1)
    layer = cls(hidden)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(hidden) * 0.5 + centre)
    return layer.to(weight_dtype)


@pytest.mark.parametrize("input_dtype,weight_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize(
    "entry",
    [(f, c) for f in REFERENCES for c in REFERENCES[f] + RUN[f]],
    ids=lambda e: e[1].split(".")[1],
)
def test_a_converted_layer_computes_what_the_original_does(entry, input_dtype, weight_dtype):
    family_name, class_entry = entry
    import_transformers()
    cls = transformers_class(class_entry)
    input_dtype, weight_dtype = DTYPES[input_dtype], DTYPES[weight_dtype]
    # Gemma's weight is an offset from 1 (zeros at init).
    original = random_layer(cls, 264, weight_dtype, 0.0 if family_name == "gemma" else 1.0)
    converted = replace_norms(copy.deepcopy(original))
    assert type(converted) is not cls and isinstance(converted, cls)

    torch.manual_seed(2)
    x = (torch.randn(3, 37, 264, dtype=torch.float64) * 2 + 0.3).to(input_dtype)
    expected, ours = original(x), converted(x)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    if expected.dtype in (torch.float16, torch.bfloat16):
        # The float32 statistics may differ in their last bits; rounded to a
        # half type, that shows in a rare element.
        # Llama's and T5's half output rounds twice (the normalized row, then
        # its product with the weight): in float16, one unit at the first may
        # become two.
        units = 2 if expected.dtype == torch.float16 else 1
        assert ulp_distance(ours, expected, expected.dtype).max() <= units
        assert (ours == expected).float().mean() >= 0.999
    else:
        # Computed in float32 (float64 input too, by all but T5): our rstd
        # comes from float64 sums, the original's from float32 ones, a few
        # float32 units apart (ours the closer to float64's, see below).
        assert ulp_distance(ours, expected, torch.float32).max() <= 8


def test_a_converted_llama_norm_is_at_least_as_accurate_as_the_original():
    import_transformers()
    original = random_layer(transformers_class("llama.LlamaRMSNorm"), 264, torch.float32, 1.0)
    converted = replace_norms(copy.deepcopy(original))
    errors = {"original": [], "ours": []}
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(3, 37, 264) * 2 + 0.3
        x64 = x.double()
        exact = (
            original.weight.double() * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6)
        )
        for name, layer in (("original", original), ("ours", converted)):
            errors[name].append(((layer(x).double() - exact).abs() / exact.abs()).max().item())
    assert max(errors["ours"]) <= max(errors["original"]), errors


@pytest.mark.parametrize("input_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("entry", [(f, REFERENCES[f][0]) for f in REFERENCES], ids=lambda e: e[0])
def test_under_autocast_a_converted_layer_computes_what_the_original_does(entry, input_dtype):
    family_name, class_entry = entry
    import_transformers()
    original = random_layer(
        transformers_class(class_entry), 64, torch.float32, 0.0 if family_name == "gemma" else 1.0
    )
    converted = replace_norms(copy.deepcopy(original))
    torch.manual_seed(11)
    x = (torch.randn(6, 64) * 2 + 0.3).to(DTYPES[input_dtype])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, ours = original(x), converted(x)
    assert ours.dtype == expected.dtype
    if expected.dtype == torch.bfloat16:
        assert ulp_distance(ours, expected, torch.bfloat16).max() <= 1
    else:
        assert ulp_distance(ours, expected, torch.float32).max() <= 8


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("entry", [(f, REFERENCES[f][0]) for f in REFERENCES], ids=lambda e: e[0])
def test_a_converted_layer_has_the_originals_gradients(entry, dtype):
    family_name, class_entry = entry
    import_transformers()
    dtype = DTYPES[dtype]
    original = random_layer(
        transformers_class(class_entry), 96, dtype, 0.0 if family_name == "gemma" else 1.0
    )
    converted = replace_norms(copy.deepcopy(original))
    torch.manual_seed(3)
    x = torch.randn(5, 7, 96, dtype=dtype) * 2 + 0.3
    grad = torch.randn(5, 7, 96, dtype=dtype)
    grads = []
    for layer in (original, converted):
        xi = x.clone().requires_grad_()
        layer(xi).backward(grad)
        grads.append((xi.grad, layer.weight.grad))
    for ours, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(
            ours, expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item()
        )


# --- whole transformers models ------------------------------------------------


def tiny_config(kind):
    transformers = import_transformers()
    if kind == "t5":
        return transformers.T5Config(
            vocab_size=97, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
            decoder_start_token_id=0,
        )  # fmt: skip
    config = {"llama": transformers.LlamaConfig, "gemma": transformers.Gemma2Config}[kind]
    return config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )  # fmt: skip


def tiny_model(kind, dtype=torch.float32):
    transformers = import_transformers()
    torch.manual_seed(4)
    config = tiny_config(kind)
    if kind == "t5":
        model = transformers.T5ForConditionalGeneration(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.to(dtype).eval()


def run_model(model, kind):
    torch.manual_seed(5)
    ids = torch.randint(0, 97, (2, 11))
    if kind == "t5":
        return model(input_ids=ids, decoder_input_ids=ids[:, :7]).logits
    return model(input_ids=ids).logits


def count_converted(model):
    return sum(type(m).__module__.startswith("layernorm_ext") for m in model.modules())


@pytest.mark.parametrize("kind", ["llama", "gemma", "t5"])
def test_a_converted_transformers_model_has_the_originals_logits_and_gradients(kind):
    original = tiny_model(kind)
    converted = replace_norms(copy.deepcopy(original))
    assert count_converted(converted) > 0
    expected, ours = run_model(original, kind), run_model(converted, kind)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    expected.square().mean().backward()
    ours.square().mean().backward()
    expected_grads = dict(original.named_parameters())
    for name, parameter in converted.named_parameters():
        torch.testing.assert_close(
            parameter.grad, expected_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name
        )


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_a_converted_bfloat16_model_has_the_originals_logits(kind):
    original = tiny_model(kind, torch.bfloat16)
    converted = replace_norms(copy.deepcopy(original))
    expected, ours = run_model(original, kind), run_model(converted, kind)
    # Identical but for a rare unit of a norm's output, carried on.
    assert (ours == expected).float().mean() >= 0.99
    torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-2)


def test_checkpoints_load_both_ways_between_original_and_converted(tmp_path):
    transformers = import_transformers()
    original = tiny_model("llama")
    converted = replace_norms(copy.deepcopy(original))
    assert list(converted.state_dict()) == list(original.state_dict())
    converted.save_pretrained(tmp_path / "converted")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert count_converted(reloaded) == 0
    torch.testing.assert_close(run_model(reloaded, "llama"), run_model(original, "llama"))
    fresh = replace_norms(tiny_model("llama"))
    fresh.load_state_dict(original.state_dict())
    torch.testing.assert_close(
        run_model(fresh, "llama"), run_model(original, "llama"), rtol=1e-5, atol=1e-5
    )


def test_a_converted_model_pickles_and_deep_copies():
    model = replace_norms(tiny_model("llama"))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (loaded, copy.deepcopy(model)):
        assert [type(m) for m in copied.modules()] == [type(m) for m in model.modules()]
        torch.testing.assert_close(run_model(copied, "llama"), run_model(model, "llama"))


def test_repr_says_the_layer_is_converted():
    import_transformers()
    layer = replace_norms(transformers_class("llama.LlamaRMSNorm")(8, eps=1e-5))
    assert repr(layer) == "LlamaRMSNorm((8,), eps=1e-05, kernels=layernorm_ext)"


def test_torch_compile_traces_a_converted_layer_without_graph_breaks():
    import_transformers()
    torch._dynamo.reset()
    for entry, centre in (("llama.LlamaRMSNorm", 1.0), ("gemma.GemmaRMSNorm", 0.0)):
        block = torch.nn.Sequential(
            torch.nn.Linear(32, 32),
            random_layer(transformers_class(entry), 32, torch.float32, centre),
        )
        replace_norms(block)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        x = torch.randn(4, 32, requires_grad=True)
        torch.testing.assert_close(compiled(x), block(x))
        compiled(x).sum().backward()


def test_torch_compile_traces_a_converted_decoder_layer_without_graph_breaks():
    import_transformers()
    from transformers.models.llama import modeling_llama

    config = tiny_config("llama")
    config._attn_implementation = "sdpa"  # an unset one logs, which breaks the graph
    torch.manual_seed(10)
    original = modeling_llama.LlamaDecoderLayer(config, 0)
    converted = replace_norms(copy.deepcopy(original))
    assert count_converted(converted) == 2
    x = torch.randn(2, 11, 64)
    positions = modeling_llama.LlamaRotaryEmbedding(config)(x, torch.arange(11)[None].expand(2, -1))
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    outputs = [
        layer(i, position_embeddings=positions) for layer, i in zip((original, compiled), inputs)
    ]
    outputs = [o[0] if isinstance(o, tuple) else o for o in outputs]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for output, i in zip(outputs, inputs):
        output.square().sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-4, atol=1e-5)


# --- timm -----------------------------------------------------------------------


def timm_layer(name, *args, **kwargs):
    timm = import_timm()
    cls = getattr(timm.layers, name)
    torch.manual_seed(6)
    layer = cls(*args, **kwargs)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return layer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize(
    "name,shape,channels_last",
    [
        ("LayerNorm", (4, 9, 48), False),
        ("LayerNormFp32", (4, 9, 48), False),
        ("RmsNorm", (4, 9, 48), False),
        ("LayerNorm2d", (2, 48, 5, 7), False),
        ("LayerNorm2d", (2, 48, 5, 7), True),
        ("LayerNorm2dFp32", (2, 48, 5, 7), True),
    ],
)
def test_a_converted_timm_layer_computes_what_the_original_does(name, shape, channels_last, dtype):
    dtype = DTYPES[dtype]
    original = timm_layer(name, 48).to(dtype)
    converted = replace_norms(copy.deepcopy(original))
    assert type(converted).__module__ == "layernorm_ext.model_norms"
    torch.manual_seed(7)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_original, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, ours = original(x_original), converted(x_ours)
    assert ours.dtype == expected.dtype and ours.stride() == expected.stride()
    if dtype == torch.bfloat16:
        assert ulp_distance(ours, expected, dtype).max() <= 1
    else:
        # The Fp32 layers compute float64 input in float32.
        compute_dtype = torch.float32 if name.endswith("Fp32") else dtype
        tolerance = 8 * torch.finfo(compute_dtype).eps
        torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    ours.backward(grad)
    # Relative to the largest element: a weight's gradient sums over rows,
    # and a sum that cancels keeps the rounding of its terms.
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    expected_grads = dict(original.named_parameters())
    pairs = [("input", x_ours.grad, x_original.grad)] + [
        (key, parameter.grad, expected_grads[key].grad)
        for key, parameter in converted.named_parameters()
    ]
    for key, ours, expected in pairs:
        scale = expected.abs().max().item()
        torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance * scale, msg=key)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "relu6", "identity", "hard_swish"])
def test_batch_norm_act_trains_as_the_original(act):
    original = timm_layer(
        "BatchNormAct2d", 12, act_layer=act, momentum=None if act == "gelu" else 0.1
    )
    converted = replace_norms(copy.deepcopy(original))
    torch.manual_seed(8)
    for step in range(3):
        x = torch.randn(4, 12, 6, 5) * 3 + 1
        if step % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        expected, ours = original(x.clone()), converted(x.clone())
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert ours.stride() == expected.stride()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(
            converted.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key
        )
    assert converted.num_batches_tracked.item() == 3
    original.eval(), converted.eval()
    x = torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="expected 4D input"):
        converted(torch.randn(2, 12, 3))


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224"])
def test_a_converted_timm_model_trains_as_the_original(name):
    # Training BatchNorm over a few positions (2x2 at EfficientNet's last
    # stages) amplifies a rounding difference into the next steps' outputs,
    # so both float32 models are held to the original run in float64.
    timm = import_timm()
    torch.manual_seed(9)
    options = {"img_size": 64} if name.startswith("vit") else {}
    original = timm.create_model(name, pretrained=False, num_classes=10, **options)
    reference = copy.deepcopy(original).double()
    converted = replace_norms(copy.deepcopy(original))
    assert count_converted(converted) > 0
    models = {"reference": reference, "original": original, "ours": converted}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    errors = {"original": [], "ours": []}
    for step in range(2):
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last
        )
        outputs = {}
        for key, model in models.items():
            optimizers[key].zero_grad()
            output = model(x if key == "reference" else x.float())
            output.square().mean().backward()
            optimizers[key].step()
            outputs[key] = output.double()
        for key in errors:
            errors[key].append((outputs[key] - outputs["reference"]).abs().max().item())
    states = {key: model.state_dict() for key, model in models.items()}
    for key in errors:
        errors[key].append(
            max(
                (value.double() - states["reference"][name].double()).abs().max().item()
                for name, value in states[key].items()
            )
        )
    for ours, original_error in zip(errors["ours"], errors["original"]):
        assert ours <= 3 * original_error + 1e-6, errors


# --- what stays as it is ----------------------------------------------------------


class LlamaRMSNorm(torch.nn.Module):
    """A model's own RMSNorm, with the name and the code of transformers'."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def test_unknown_classes_and_subclasses_stay_and_are_reported(caplog):
    import_transformers()
    registered = transformers_class("llama.LlamaRMSNorm")

    class CustomRMSNorm(registered):
        pass

    model = torch.nn.Sequential(
        LlamaRMSNorm(8), CustomRMSNorm(8), registered(8), torch.nn.Linear(8, 8)
    )
    with caplog.at_level(logging.INFO, logger="layernorm_ext"):
        replace_norms(model)
    assert type(model[0]) is LlamaRMSNorm and type(model[1]) is CustomRMSNorm
    assert type(model[2]).__module__ == "layernorm_ext.model_norms"
    assert "converted 1 LlamaRMSNorm" in caplog.text
    assert "left alone 1 LlamaRMSNorm, 1 test_unknown_classes_and_subclasses_stay" in caplog.text
    assert "CustomRMSNorm" in caplog.text


def test_exclude_leaves_those_classes_alone():
    import_transformers()
    registered = transformers_class("llama.LlamaRMSNorm")
    model = torch.nn.Sequential(registered(8), torch.nn.LayerNorm(8))
    replace_norms(model, exclude=[registered])
    assert type(model[0]) is registered
    assert type(model[1]).__module__ == "layernorm_ext.layer_norm"
