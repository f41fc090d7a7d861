"""Model families for int8 loading: how to recognise each from its keys, and which layers stay float.

Exclusion lists follow the public INT8 packs, rewritten as module-path components
so `layers.3` cannot match `layers.35` and a list cannot silently hit a renamed module: every
pattern names modules that exist in ComfyUI's implementation of that family. What they keep float
are the layers that run with M = batch size (timestep/guidance embedders, AdaLN generators, final
projections) or that see raw inputs (patch and caption embedders): they cost almost no compute and
carry most of the quantization risk.

`auto` detects the family from marker keys (the ones ComfyUI's own model detection keys on). A
chosen `model_type` that contradicts the detected family is an error — the public packs silently
applied the wrong list and produced noise (BobJohnson24/ComfyUI-INT8-Fast #91).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..kernels.quant_layer import ExclusionRules


@dataclass(frozen=True)
class ModelFamily:
    name: str                        # the `model_type` value
    title: str                       # what users call it
    markers: tuple[str, ...]         # keys (after the diffusion-model prefix) that all must exist
    excluded: tuple[str, ...]        # module-path patterns kept float during on-the-fly quantization

    def rules(self) -> ExclusionRules:
        return ExclusionRules.of(self.excluded)


# Detection order matters where families share keys: Flux.2 and Chroma before Flux.1.
FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("flux2", "Flux.2", ("double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.qkv.weight"),
                ("img_in", "time_in", "guidance_in", "txt_in", "final_layer", "double_stream_modulation_img",
                 "double_stream_modulation_txt", "single_stream_modulation")),
    ModelFamily("chroma", "Chroma", ("distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"),
                ("distilled_guidance_layer", "final_layer", "img_in", "txt_in", "nerf_image_embedder", "nerf_blocks",
                 "nerf_final_layer_conv")),
    ModelFamily("flux1", "Flux.1", ("double_blocks.0.img_mod.lin.weight", "img_in.weight"),
                ("img_in", "time_in", "vector_in", "guidance_in", "txt_in", "final_layer")),
    ModelFamily("z-image", "Z-Image / Lumina 2", ("cap_embedder.1.weight", "layers.0.attention.qkv.weight"),
                ("cap_embedder", "t_embedder", "x_embedder", "context_refiner", "noise_refiner", "final_layer",
                 "adaLN_modulation", "layers.0")),
    ModelFamily("wan", "Wan 2.1/2.2", ("head.modulation", "blocks.0.self_attn.q.weight"),
                ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "head", "img_emb",
                 "audio_adapter")),
    ModelFamily("ltx2", "LTX-Video / LTX-2", ("adaln_single.emb.timestep_embedder.linear_1.weight",
                                             "transformer_blocks.0.attn1.to_q.weight"),
                ("adaln_single", "audio_adaln_single", "av_ca_*_adaln_single", "caption_projection",
                 "audio_caption_projection", "patchify_proj", "audio_patchify_proj", "proj_out", "audio_proj_out")),
    ModelFamily("qwen", "Qwen-Image", ("txt_norm.weight", "transformer_blocks.0.attn.add_q_proj.weight"),
                ("time_text_embed", "img_in", "norm_out", "proj_out", "txt_in")),
    ModelFamily("ernie", "ERNIE-Image", ("adaLN_modulation.1.weight", "layers.0.self_attention.to_q.weight"),
                ("time_embedding", "x_embedder", "adaLN_modulation", "text_proj", "final_norm", "final_linear",
                 "layers.0", "layers.35")),
    ModelFamily("anima", "Anima", ("llm_adapter.blocks.0.cross_attn.q_proj.weight", "blocks.0.mlp.layer1.weight"),
                ("x_embedder", "t_embedder", "llm_adapter", "final_layer", "adaln_modulation*")),
    ModelFamily("sdxl", "SDXL / SD UNet", ("input_blocks.0.0.weight", "time_embed.0.weight"),
                ("time_embed", "label_emb", "emb_layers", "proj_in", "proj_out")),
)
BY_NAME = {f.name: f for f in FAMILIES}
MODEL_TYPES: tuple[str, ...] = ("auto", "flux2", "flux1", "z-image", "chroma", "wan", "ltx2", "qwen", "ernie",
                                "anima", "sdxl")


class ModelTypeError(ValueError):
    """The chosen model_type does not fit the checkpoint, or is not a known type."""


@dataclass(frozen=True)
class Detection:
    family: ModelFamily | None
    prefix: str                      # the diffusion-model prefix the markers were found under
    evidence: tuple[str, ...]        # the marker keys, as found


def _find(keys: set[str], family: ModelFamily) -> Detection | None:
    first = family.markers[0]
    for key in keys:
        if key.endswith(first):
            prefix = key[: len(key) - len(first)]
            if prefix and not prefix.endswith("."):
                continue
            found = tuple(prefix + m for m in family.markers)
            if all(k in keys for k in found):
                return Detection(family, prefix, found)
    return None


def detect(keys: Iterable[str]) -> Detection:
    """The family whose marker keys a state dict has (family None when none matches)."""
    keyset = set(keys)
    for family in FAMILIES:
        found = _find(keyset, family)
        if found is not None:
            return found
    return Detection(None, "", ())


@dataclass(frozen=True)
class Resolution:
    """The family a load uses, its exclusion rules and a sentence saying how it was chosen."""

    name: str                        # family name, or "unknown"
    rules: ExclusionRules
    message: str
    prefix: str = ""                 # the diffusion-model key prefix the family was detected under


def conservative_rules() -> ExclusionRules:
    """Every family's list at once: for an architecture we cannot identify."""
    rules = ExclusionRules()
    for family in FAMILIES:
        rules = rules.union(family.rules())
    return rules


def resolve(model_type: str, keys: Iterable[str]) -> Resolution:
    """Apply the node's `model_type` to a checkpoint: detect for `auto`, check a chosen type against it."""
    if model_type not in MODEL_TYPES:
        raise ModelTypeError(f"Unknown model_type '{model_type}'. Valid choices: {', '.join(MODEL_TYPES)}.")
    found = detect(keys)
    if model_type == "auto":
        if found.family is None:
            return Resolution("unknown", conservative_rules(),
                              "model_type auto: no known family's marker keys found; on-the-fly quantization keeps "
                              "every layer any family's list excludes (the conservative union)")
        return Resolution(found.family.name, found.family.rules(),
                          f"model_type auto: detected {found.family.title} (found {', '.join(found.evidence)})",
                          found.prefix)
    chosen = BY_NAME[model_type]
    if found.family is not None and found.family.name != chosen.name:
        raise ModelTypeError(
            f"model_type '{model_type}' ({chosen.title}) does not match this checkpoint: it is a "
            f"{found.family.title} model (it has {', '.join(found.evidence)}). Its layers would get the wrong "
            f"exclusion list and produce noise. Choose '{found.family.name}' or 'auto'.")
    if found.family is None:
        return Resolution(chosen.name, chosen.rules(),
                          f"model_type {model_type}: chosen by you; the checkpoint's keys could not confirm it "
                          f"(no {chosen.title} marker keys {', '.join(chosen.markers)})")
    return Resolution(chosen.name, chosen.rules(), f"model_type {model_type}: confirmed by {', '.join(found.evidence)}",
                      found.prefix)
