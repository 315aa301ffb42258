"""The norm layers of Hugging Face transformers and timm models that
``replace_norms`` converts, and what each converted layer computes.

A layer is converted only when its class *is* one listed here: the class
object found under its module and name, in a module that the model itself
imported (only loading a pickled model imports one, see __getattr__). Never
by a name or a shape alone, so a
model's own ``MyRMSNorm`` stays as it is, whatever it computes.

Each family's forward reproduces the original's arithmetic (where it
computes in float32, when it rounds to which dtype) with layernorm_ext's
kernels; where our kernels cannot reproduce a dtype combination's rounding
(T5's float64 input, say), the converted layer runs the original forward.
A converted layer is the same object with a subclass of its own class, so
its parameters, buffers, ``state_dict`` keys, hooks and ``isinstance`` checks
are kept; ``repr`` ends in ``kernels=layernorm_ext``.

The transformers lists name classes as ``<model folder>.<class name>``, the
class being defined in ``transformers.models.<folder>.modeling_<folder>``:
they are the classes of transformers 5.25 whose code is the family's
reference class's (tests/test_model_norms.py checks each against the
installed transformers, and looks there for classes missing from them).
"""

import functools
import importlib
import sys
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from .batch_norm import _batch_norm_module_forward
from .layer_norm import layer_norm
from .rms_norm import rms_norm

# Input dtypes that our kernels compute in float32, with float32 parameters
# allowed: for these, norm(x.float(), ...).to(x.dtype) needs no copies.
_FLOAT32_ARITHMETIC = (torch.float32, torch.bfloat16, torch.float16)


def _rms_in_float32(x, weight, eps):
    """``x * rsqrt(mean(x**2, -1) + eps) * weight``, computed in float32 from
    ``x.float()`` and ``weight.float()``, rounded once to x's dtype."""
    weight = None if weight is None else weight.float()
    if x.dtype in _FLOAT32_ARITHMETIC:
        return rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def _layer_norm_in_float32(x, normalized_shape, weight, bias, eps):
    """``layer_norm`` computed from ``x.float()`` and float32 parameters,
    rounded once to x's dtype (timm's ``*Fp32`` layers)."""
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    if x.dtype in _FLOAT32_ARITHMETIC:
        return layer_norm(x, normalized_shape, weight, bias, eps)
    return layer_norm(x.float(), normalized_shape, weight, bias, eps).to(x.dtype)


def _original_forward(layer, input):
    return type(layer)._layernorm_ext_original.forward(layer, input)


# --- transformers -----------------------------------------------------------


def _llama_rms_norm_forward(self, hidden_states):
    # weight * (x.float() * rsqrt(mean(x**2) + eps)).to(x.dtype): the
    # normalized row is rounded to the input's dtype before the weight
    # multiply, which runs in the promoted dtype of the two.
    weight, eps = self.weight, self.variance_epsilon
    if hidden_states.dtype == torch.float32 and weight.dtype in _FLOAT32_ARITHMETIC:
        # Nothing is rounded between the two products: one kernel.
        return _rms_in_float32(hidden_states, weight, eps)
    return weight * _rms_in_float32(hidden_states, None, eps)


def _weight_in_float32_rms_norm_forward(self, hidden_states):
    # (weight * x.float() * rsqrt(mean(x**2) + eps)).to(x.dtype), all in float32.
    if self.weight.dtype in _FLOAT32_ARITHMETIC:
        return _rms_in_float32(hidden_states, self.weight, self.variance_epsilon)
    return _original_forward(self, hidden_states)


def _gemma_rms_norm_forward(self, x):
    # (x.float() * rsqrt(mean(x**2) + eps) * (1 + weight.float())).to(x.dtype).
    return _rms_in_float32(x, 1.0 + self.weight.float(), self.eps)


def _t5_layer_norm_forward(self, hidden_states):
    # The mean of squares in float32, times x in x's dtype (so in float32 for
    # float32 and half input), rounded to the weight's dtype when that is a
    # half type, times the weight.
    weight, eps = self.weight, self.variance_epsilon
    if weight.dtype in (torch.float16, torch.bfloat16):
        if hidden_states.dtype in (torch.float32, weight.dtype):
            return weight * _rms_in_float32(hidden_states, None, eps).to(weight.dtype)
    elif weight.dtype == torch.float32 and hidden_states.dtype in _FLOAT32_ARITHMETIC:
        return rms_norm(hidden_states.float(), (hidden_states.shape[-1],), weight, eps)
    return _original_forward(self, hidden_states)


# --- timm -------------------------------------------------------------------


def _timm_layer_norm_forward(self, x):
    return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _timm_layer_norm_fp32_forward(self, x):
    return _layer_norm_in_float32(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _timm_layer_norm_2d_forward(self, x):
    # Over the channels of NCHW input. The permuted view of a channels_last
    # input is contiguous; the CPU kernels read that of an NCHW one as it is,
    # and its gradient (row_norm_ops::is_channels_first_view): no copies.
    x = layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
    return x.permute(0, 3, 1, 2)


def _timm_layer_norm_2d_fp32_forward(self, x):
    x = _layer_norm_in_float32(
        x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
    )
    return x.permute(0, 3, 1, 2)


def _timm_rms_norm_forward(self, x):
    return rms_norm(x, self.normalized_shape, self.weight, self.eps)


def _timm_batch_norm_act_forward(self, x):
    # BatchNorm2d, then the layer's drop and act modules.
    torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
    x = _batch_norm_module_forward(self, x)
    return self.act(self.drop(x))


# --- the registry -----------------------------------------------------------


class Family(NamedTuple):
    """Classes that compute the same thing, and the forward that computes it
    with our kernels."""

    name: str
    forward: Callable
    classes: Tuple[Tuple[str, str], ...]  # (module, class name)


def _transformers_classes(listing: str) -> Tuple[Tuple[str, str], ...]:
    classes = []
    for entry in listing.split():
        folder, name = entry.split(".")
        classes.append((f"transformers.models.{folder}.modeling_{folder}", name))
    return tuple(classes)


_LLAMA_CLASSES = """
    aimv2.Aimv2RMSNorm apertus.ApertusRMSNorm apertus1p5.Apertus1p5TextRMSNorm
    arcee.ArceeRMSNorm aria.AriaTextRMSNorm axk1.AXK1RMSNorm axk2.AXK2RMSNorm
    bailing_hybrid.BailingHybridRMSNorm bamba.BambaRMSNorm bitnet.BitNetRMSNorm
    blt.BltRMSNorm chameleon.ChameleonRMSNorm clvp.ClvpRMSNorm
    cohere2_moe.Cohere2MoeRMSNorm cosmos3_edge.Cosmos3EdgeTextRMSNorm csm.CsmRMSNorm
    cwm.CwmRMSNorm deepseek_ocr2.DeepseekOcr2VisionRMSNorm
    deepseek_ocr2.DeepseekOcr2TextRMSNorm deepseek_v2.DeepseekV2RMSNorm
    deepseek_v3.DeepseekV3RMSNorm deepseek_v32.DeepseekV32RMSNorm deimv2.Deimv2RMSNorm
    dia.DiaRMSNorm diffllama.DiffLlamaRMSNorm doge.DogeRMSNorm dots1.Dots1RMSNorm
    dots3_note.Dots3NoteRMSNorm emu3.Emu3RMSNorm ernie4_5.Ernie4_5RMSNorm
    ernie4_5_moe.Ernie4_5_MoeRMSNorm ernie4_5_vl_moe.Ernie4_5_VLMoeRMSNorm
    eurobert.EuroBertRMSNorm evolla.EvollaRMSNorm exaone4.Exaone4RMSNorm
    exaone4_5.Exaone4_5_RMSNorm exaone_moe.ExaoneMoeRMSNorm falcon_h1.FalconH1RMSNorm
    falcon_mamba.FalconMambaRMSNorm glm.GlmRMSNorm glm4.Glm4RMSNorm
    glm4_moe.Glm4MoeRMSNorm glm4_moe_lite.Glm4MoeLiteRMSNorm glm4v.Glm4vRMSNorm
    glm4v_moe.Glm4vMoeTextRMSNorm glm4v_moe.Glm4vMoeRMSNorm
    glm5_next.Glm5NextTextRMSNorm glm5_next.Glm5NextRMSNorm glm_image.GlmImageRMSNorm
    glm_moe_dsa.GlmMoeDsaRMSNorm glm_ocr.GlmOcrRMSNorm granite.GraniteRMSNorm
    granite4_vision.Granite4VisionTextRMSNorm granite_docling.GraniteDoclingTextRMSNorm
    granite_swa.GraniteSWARMSNorm granitemoe.GraniteMoeRMSNorm
    granitemoe_swa.GraniteMoeSWARMSNorm granitemoehybrid.GraniteMoeHybridRMSNorm
    granitemoeshared.GraniteMoeSharedRMSNorm higgs_audio_v2.HiggsAudioV2RMSNorm
    hunyuan_v1_dense.HunYuanDenseV1RMSNorm hunyuan_v1_moe.HunYuanMoEV1RMSNorm
    hunyuan_vl.HunYuanVLRMSNorm hy_v3.HYV3RMSNorm hy_v4.HYV4RMSNorm
    hy_v4_vl.HYV4VLRMSNorm hyperclovax.HyperCLOVAXRMSNorm idefics2.Idefics2RMSNorm
    idefics3.Idefics3RMSNorm inkling.InklingRMSNorm internvl.InternVLVisionRMSNorm
    jamba.JambaRMSNorm jetmoe.JetMoeRMSNorm kimi_linear.KimiLinearRMSNorm
    kolibri1.Kolibri1RMSNorm kolibri1_1.Kolibri1_1RMSNorm laguna.LagunaRMSNorm
    lfm2.Lfm2RMSNorm lfm2_moe.Lfm2MoeRMSNorm lfm3.Lfm3RMSNorm
    lfm3_vl.Lfm3VlVisionRMSNorm lighton_ocr.LightOnOcrRMSNorm llama.LlamaRMSNorm
    longcat_flash.LongcatFlashRMSNorm mamba.MambaRMSNorm mamba2.Mamba2RMSNorm
    mellum.MellumRMSNorm mimo_v2_flash.MiMoV2FlashRMSNorm minicpm3.MiniCPM3RMSNorm
    minicpm5_moe.MiniCPM5MoeRMSNorm minimax.MiniMaxRMSNorm minimax_m2.MiniMaxM2RMSNorm
    ministral.MinistralRMSNorm ministral3.Ministral3RMSNorm mistral.MistralRMSNorm
    mistral3.Mistral3RMSNorm mistral4.Mistral4RMSNorm
    mistral_large4.MistralLarge4RMSNorm mixtral.MixtralRMSNorm mllama.MllamaTextRMSNorm
    molmo2.Molmo2RMSNorm muse_glimmer_assistant.MuseGlimmerAssistantRMSNorm
    neucodec.NeuCodecRMSNorm olmoe.OlmoeRMSNorm ovis2.Ovis2RMSNorm
    paddleocr_vl.PaddleOCRRMSNorm pe_audio.PeAudioEncoderRMSNorm
    pe_audio_video.PeAudioVideoEncoderRMSNorm pe_video.PeVideoEncoderRMSNorm
    phi3.Phi3RMSNorm phi4_multimodal.Phi4MultimodalRMSNorm pixtral.PixtralRMSNorm
    qianfan_ocr.QianfanOCRVisionRMSNorm qwen2.Qwen2RMSNorm
    qwen2_5_omni.Qwen2_5OmniRMSNorm qwen2_5_vl.Qwen2_5_VLRMSNorm
    qwen2_moe.Qwen2MoeRMSNorm qwen2_vl.Qwen2VLRMSNorm qwen3.Qwen3RMSNorm
    qwen3_moe.Qwen3MoeRMSNorm qwen3_omni_moe.Qwen3OmniMoeThinkerTextRMSNorm
    qwen3_omni_moe.Qwen3OmniMoeTextRMSNorm qwen3_omni_moe.Qwen3OmniMoeRMSNorm
    qwen3_omni_moe.Qwen3OmniMoeCode2WavRMSNorm qwen3_vl.Qwen3VLTextRMSNorm
    qwen3_vl_moe.Qwen3VLMoeTextRMSNorm sapiens2.Sapiens2RMSNorm seed_oss.SeedOssRMSNorm
    smollm3.SmolLM3RMSNorm solar_open.SolarOpenRMSNorm timesfm.TimesFmRMSNorm
    timesfm2_5.TimesFm2_5RMSNorm ultrabert.UltrabertRMSNorm ultravbert.UltraVBertRMSNorm
    unlimited_ocr.UnlimitedOcrTextRMSNorm vibevoice.VibeVoiceRMSNorm
    vibevoice_acoustic_tokenizer.VibeVoiceAcousticTokenizerRMSNorm
    vibevoice_asr.VibeVoiceAsrRMSNorm voxtral_realtime.VoxtralRealtimeRMSNorm
    xcodec2.Xcodec2RMSNorm youtu.YoutuRMSNorm zamba.ZambaRMSNorm zamba2.Zamba2RMSNorm
    zaya.ZayaRMSNorm
"""

_GEMMA_CLASSES = """
    gemma.GemmaRMSNorm gemma2.Gemma2RMSNorm gemma3.Gemma3RMSNorm
    minimax_m3_vl.MiniMaxM3VLRMSNorm muse_glimmer.MuseGlimmerTextCenteredRMSNorm
    qwen3_5.Qwen3_5RMSNorm qwen3_5_moe.Qwen3_5MoeRMSNorm qwen3_next.Qwen3NextRMSNorm
    recurrent_gemma.RecurrentGemmaRMSNorm step3p7.Step3p7RMSNorm t5gemma.T5GemmaRMSNorm
    t5gemma2.T5Gemma2RMSNorm vaultgemma.VaultGemmaRMSNorm
"""

_T5_CLASSES = """
    idefics.IdeficsRMSNorm kosmos2_5.Kosmos2_5LayerNorm longt5.LongT5LayerNorm
    mt5.MT5LayerNorm pix2struct.Pix2StructLayerNorm pop2piano.Pop2PianoLayerNorm
    switch_transformers.SwitchTransformersLayerNorm t5.T5LayerNorm udop.UdopLayerNorm
    umt5.UMT5LayerNorm
"""

_WEIGHT_IN_FLOAT32_CLASSES = """
    afmoe.AfmoeRMSNorm beam.BeamRMSNorm deepseek_v4.DeepseekV4RMSNorm
    flex_olmo.FlexOlmoRMSNorm flint.FlintRMSNorm gpt_oss.GptOssRMSNorm
    inkling2.Inkling2RMSNorm inkling2_loop.Inkling2LoopRMSNorm olmo2.Olmo2RMSNorm
    olmo3.Olmo3RMSNorm olmo_hybrid.OlmoHybridRMSNorm
    openai_privacy_filter.OpenAIPrivacyFilterRMSNorm helium.HeliumRMSNorm
    lara_mini.LaraMiniRMSNorm nemotron_h.NemotronHRMSNorm
    nemotron_h_omni.NemotronH_Omni_RMSNorm
"""


FAMILIES = (
    Family("llama", _llama_rms_norm_forward, _transformers_classes(_LLAMA_CLASSES)),
    Family("gemma", _gemma_rms_norm_forward, _transformers_classes(_GEMMA_CLASSES)),
    Family("t5", _t5_layer_norm_forward, _transformers_classes(_T5_CLASSES)),
    Family(
        "weight_in_float32",
        _weight_in_float32_rms_norm_forward,
        _transformers_classes(_WEIGHT_IN_FLOAT32_CLASSES),
    ),
    Family("timm_layer_norm", _timm_layer_norm_forward, (("timm.layers.norm", "LayerNorm"),)),
    Family(
        "timm_layer_norm_fp32",
        _timm_layer_norm_fp32_forward,
        (("timm.layers.norm", "LayerNormFp32"),),
    ),
    Family(
        "timm_layer_norm_2d", _timm_layer_norm_2d_forward, (("timm.layers.norm", "LayerNorm2d"),)
    ),
    Family(
        "timm_layer_norm_2d_fp32",
        _timm_layer_norm_2d_fp32_forward,
        (("timm.layers.norm", "LayerNorm2dFp32"),),
    ),
    Family("timm_rms_norm", _timm_rms_norm_forward, (("timm.layers.norm", "RmsNorm"),)),
    Family(
        "timm_batch_norm_act",
        _timm_batch_norm_act_forward,
        (("timm.layers.norm_act", "BatchNormAct2d"),),
    ),
)

_FAMILY_OF: Dict[Tuple[str, str], Family] = {
    cls: family for family in FAMILIES for cls in family.classes
}
# Class names are unique across the registry: a converted class is found by
# its name alone when a pickle is loaded (see __getattr__).
_MODULE_OF_NAME: Dict[str, str] = {name: module for module, name in _FAMILY_OF}


def converted_class(cls: type) -> Optional[type]:
    """Our subclass of ``cls`` if ``cls`` is a registered class, else None."""
    family = _FAMILY_OF.get((cls.__module__, cls.__qualname__))
    if family is None:
        return None
    module = sys.modules.get(cls.__module__)
    if module is None or getattr(module, cls.__qualname__, None) is not cls:
        return None  # a class of that name, but not the registered one
    return _subclass(cls, family)


def _extra_repr(self) -> str:
    original = type(self)._layernorm_ext_original.extra_repr(self)
    return f"{original}, kernels=layernorm_ext" if original else "kernels=layernorm_ext"


@functools.lru_cache(maxsize=None)
def _subclass(original: type, family: Family) -> type:
    return type(
        original.__name__,
        (original,),
        {
            "__module__": __name__,
            "__qualname__": original.__name__,
            "__doc__": f"{original.__module__}.{original.__name__}, computed by "
            f"layernorm_ext's kernels (the {family.name} family).",
            "forward": family.forward,
            "extra_repr": _extra_repr,
            "_layernorm_ext_original": original,
        },
    )


def __getattr__(name: str) -> type:
    # pickle finds a converted class by this module and the class's name.
    module = _MODULE_OF_NAME.get(name)
    if module is not None:
        original = getattr(importlib.import_module(module), name, None)
        converted = None if original is None else converted_class(original)
        if converted is not None:
            return converted
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
