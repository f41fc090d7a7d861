"""The example workflows that run on a CPU with tiny random-weight models the pack builds itself.

Each family adds one DemoCase. `prepare(models_root, input_root)` writes whatever the workflow
needs (tiny checkpoints with the real key names, input images or meshes) and returns nothing;
the workflow's API-format twin then names those files. `python -m slipstream demo` runs these
in the standalone host, and tests/integration posts them to a real ComfyUI.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoCase:
    name: str                                   # short id, e.g. "wan_t2v"
    workflow: str                               # API-format file under workflows/, e.g. "wan_t2v_api.json"
    prepare: Callable[[Path, Path], None]       # (models_root, input_root) -> writes tiny assets
    description: str                            # one line shown by `demo`
    needs_comfyui_nodes: bool = False           # True if the workflow also uses core ComfyUI nodes


def _deferred(module: str, name: str) -> Callable[[Path, Path], None]:
    """A prepare function that imports `name` from the pack's `module` only when a demo runs."""

    def prepare(models_root: Path, input_root: Path) -> None:
        getattr(importlib.import_module(f"..{module}", __package__), name)(models_root, input_root)

    return prepare


def demo_cases() -> list[DemoCase]:
    """All CPU-runnable demos, imported lazily so `python -m slipstream nodes` stays fast."""
    cases: list[DemoCase] = []

    # MIA rigging
    def prepare_mia(models_root: Path, input_root: Path) -> None:
        from ..models.mia.humanoid import write_demo_assets

        write_demo_assets(str(models_root / "mia"), str(input_root / "3d" / "mia_demo_humanoid.glb"))

    cases.append(DemoCase("mia_rig", "mia_rig_api.json", prepare_mia,
                          "Auto-rig a procedural humanoid with miniature random-weight MIA networks -> rigged GLB"))

    # anima family (context tokens)
    from ..models.anima.tiny import prepare_demo as prepare_anima

    cases.append(DemoCase("anima_context", "anima_train_context_api.json", prepare_anima,
                          "Anima: train reference context tokens from one image and save them"))

    # Wan 2.1 video
    prepare_wan = _deferred("models.wan.demo_assets", "write_tiny_wan_models")

    cases.append(DemoCase("wan_t2v", "wan_t2v_api.json", prepare_wan,
                          "Text to video with a tiny random-weight Wan 2.1 DiT, umT5 and VAE -> 9-frame mp4"))
    cases.append(DemoCase("wan_vace", "wan_vace_control_api.json", prepare_wan,
                          "VACE control: a tiny T2V clip re-rendered by a tiny random-weight VACE DiT following "
                          "its motion, with a reference image -> mp4"))
    cases.append(DemoCase("wan_i2v", "wan_i2v_api.json", prepare_wan,
                          "Image to video (CLIP vision, block swap) with tiny random-weight Wan 2.1 models -> mp4"))
    prepare_distill_demo = _deferred("models.wan.demo_sampler_assets", "prepare_distill_demo")
    prepare_a14b_demo = _deferred("models.wan.demo_sampler_assets", "prepare_a14b_demo")

    cases.append(DemoCase("wan_t2v_distill_teacache_slg", "wan_t2v_distill_teacache_slg_api.json",
                          prepare_distill_demo,
                          "Wan T2V with a distill LoRA, TeaCache and Skip Layer Guidance (tiny random weights) -> mp4"))
    cases.append(DemoCase("wan_t2v_distill_nag_easycache", "wan_t2v_distill_nag_easycache_api.json",
                          prepare_distill_demo,
                          "Wan T2V with a distill LoRA at cfg 1, the negative prompt through NAG, and EasyCache at "
                          "its default (tiny random weights) -> mp4"))
    cases.append(DemoCase("wan22_a14b_t2v", "wan22_a14b_t2v_api.json", prepare_a14b_demo,
                          "Wan 2.2 A14B T2V: high- and low-noise experts switching at the boundary (tiny) -> mp4"))
    prepare_fun22_control_demo = _deferred("models.wan.demo_sampler_assets", "prepare_fun22_control_demo")

    cases.append(DemoCase("wan22_fun_control", "wan22_fun_control_api.json", prepare_fun22_control_demo,
                          "Wan 2.2 Fun Control A14B: a tiny T2V clip re-rendered by two tiny random-weight Fun "
                          "Control experts following it, with a reference image -> mp4"))
    cases.append(DemoCase("wan22_ti2v_i2v", "wan22_ti2v_i2v_api.json", prepare_wan,
                          "Image to video with a tiny random-weight Wan 2.2 TI2V-5B DiT and Wan 2.2 VAE (clean first "
                          "latent frame) -> mp4"))
    cases.append(DemoCase("wan_flf2v", "wan_flf2v_api.json", prepare_wan,
                          "First/last-frame video (two-image CLIP context, end-frame mask) with a tiny random-weight "
                          "FLF2V DiT -> mp4"))
    # Speech-driven Wan 2.1 I2V (MultiTalk / InfiniteTalk, FantasyTalking), fed by core Load Audio
    prepare_speech = _deferred("models.wan.demo_speech_assets", "write_speech_demo")

    cases.append(DemoCase("wan_multitalk_long", "wan_multitalk_long_api.json", prepare_speech,
                          "MultiTalk streaming: a WAV through a tiny wav2vec2 and tiny MultiTalk weights, three clips "
                          "each continuing from the last frames of the one before -> mp4 with the speech",
                          needs_comfyui_nodes=True))
    cases.append(DemoCase("wan_multitalk_two_speakers", "wan_multitalk_two_speakers_api.json", prepare_speech,
                          "MultiTalk with two speakers (left / right, one after the other) and audio guidance "
                          "(tiny random weights) -> mp4 with both voices", needs_comfyui_nodes=True))
    cases.append(DemoCase("wan_fantasytalking", "wan_fantasytalking_api.json", prepare_speech,
                          "FantasyTalking: a WAV drives a tiny random-weight speech model on the I2V DiT with text "
                          "and audio guidance -> mp4 with the speech", needs_comfyui_nodes=True))
    # INT8 W8A8
    def prepare_int8(models_root: Path, input_root: Path) -> None:
        from ..models.quant_build import DEMO_CHECKPOINT, write_demo_checkpoint

        write_demo_checkpoint(str(models_root / "diffusion_models" / DEMO_CHECKPOINT))

    cases.append(DemoCase("int8_quantize", "int8_quantize_api.json", prepare_int8,
                          "Quantize a tiny bf16 Wan 2.1 DiT to int8 on the fly and save it in ComfyUI's int8 format"))
    return cases
