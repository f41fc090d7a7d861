"""The registration table: every node of the pack, its id, class and display name.

Ids are stored in users' workflows: once released they never change.
"""

from __future__ import annotations

from . import (
    anima,
    anima_loaders,
    audio,
    memory,
    memory_loaders,
    mia,
    quant,
    video,
    wan,
    wan_bridges,
    wan_cache_calibration,
    wan_conditioning,
    wan_core,
    wan_encoders,
    wan_fantasytalking,
    wan_multitalk,
    wan_options,
    wan_speech,
)

NODES: list[tuple[str, type, str]] = [
    # (node id, class, display name)
    # memory family
    ("ArchAi3D_Offload_CLIP", memory.OffloadClipToDram, "🧠Offload CLIP to DRAM"),
    ("SlipstreamMemoryCleanup", memory.MemoryCleanup, "Memory Cleanup"),
    ("SlipstreamCLIPLoaderKeyed", memory_loaders.SlipstreamCLIPLoaderKeyed, "Load CLIP (keyed)"),
    ("SlipstreamDualCLIPLoaderKeyed", memory_loaders.SlipstreamDualCLIPLoaderKeyed, "Load Dual CLIP (keyed)"),
    # MIA rigging
    ("MIALoadModel", mia.MIALoadModel, "MIA: Load Model"),
    ("MIAAutoRig", mia.MIAAutoRig, "MIA: Auto Rig"),
    ("SlipstreamLoadMesh", mia.SlipstreamLoadMesh, "Load Mesh"),
    # video family
    ("SlipstreamVideoCombine", video.SlipstreamVideoCombine, "Video Combine"),
    # anima family (context tokens)
    ("AnimaFastTrainReferenceContext", anima.AnimaFastTrainReferenceContext, "AnimaFastTrain - Train Context Tokens"),
    ("AnimaFastTrainMaskedReferenceContext", anima.AnimaFastTrainMaskedReferenceContext,
     "AnimaFastTrain - MaskTrain Context Tokens"),
    ("AnimaFastTrainPatchModel", anima.AnimaFastTrainPatchModel, "AnimaFastTrain - Patch Model"),
    ("SlipstreamAnimaSaveReferenceContext", anima.SlipstreamAnimaSaveReferenceContext, "Save Anima Reference Context"),
    ("SlipstreamAnimaLoadReferenceContext", anima.SlipstreamAnimaLoadReferenceContext, "Load Anima Reference Context"),
    ("SlipstreamAnimaModelLoader", anima_loaders.SlipstreamAnimaModelLoader, "Load Anima Model"),
    ("SlipstreamAnimaTextEncoderLoader", anima_loaders.SlipstreamAnimaTextEncoderLoader, "Load Anima Text Encoder"),
    ("SlipstreamAnimaVAELoader", anima_loaders.SlipstreamAnimaVAELoader, "Load Anima VAE"),
    ("SlipstreamLoadReferenceImage", anima_loaders.SlipstreamLoadReferenceImage, "Load Reference Image"),
    # wan family (Wan 2.1 video)
    ("SlipstreamWanModelLoader", wan.WanModelLoader, "Wan Model Loader"),
    ("SlipstreamWanBlockSwap", wan.WanBlockSwap, "Wan Block Swap"),
    ("SlipstreamWanCompileSettings", wan.WanCompileSettings, "Wan Compile Settings"),
    ("SlipstreamWanLoraSelect", wan.WanLoraSelect, "Wan LoRA Select"),
    ("SlipstreamWanApplyLora", wan.WanApplyLora, "Wan Apply LoRA"),
    ("SlipstreamWanEnhanceVideo", wan_options.WanEnhanceVideo, "Wan Enhance-A-Video"),
    ("SlipstreamWanContextOptions", wan_options.WanContextOptions, "Wan Context Options"),
    ("SlipstreamWanSampler", wan.WanSampler, "Wan Sampler"),
    ("SlipstreamWanCacheArgs", wan_options.WanCacheArgs, "Wan Cache Args"),
    ("SlipstreamWanCacheCalibrate", wan_cache_calibration.WanCacheCalibrate, "Wan Cache Calibrate"),
    ("SlipstreamWanSkipLayerGuidance", wan_options.WanSkipLayerGuidance, "Wan Skip Layer Guidance"),
    ("SlipstreamWanGuidanceOptions", wan_options.WanGuidanceOptions, "Wan Guidance Options"),
    ("SlipstreamWanNagOptions", wan_options.WanNagOptions, "Wan NAG Options"),
    ("SlipstreamWanTextEncoderLoader", wan_encoders.WanTextEncoderLoader, "Wan Text Encoder Loader"),
    ("SlipstreamWanTextEncode", wan_encoders.WanTextEncode, "Wan Text Encode"),
    ("SlipstreamWanClipVisionLoader", wan_encoders.WanClipVisionLoader, "Wan CLIP Vision Loader"),
    ("SlipstreamWanClipVisionEncode", wan_encoders.WanClipVisionEncode, "Wan CLIP Vision Encode"),
    ("SlipstreamWanVAELoader", wan_encoders.WanVAELoader, "Wan VAE Loader"),
    ("SlipstreamFantasyTalkingEmbeds", wan_fantasytalking.WanFantasyTalkingEmbeds, "Wan FantasyTalking Audio Embeds"),
    ("SlipstreamWanEmptyEmbeds", wan_encoders.WanEmptyEmbeds, "Wan Empty Embeds"),
    ("SlipstreamWanImageToVideoEncode", wan_encoders.WanImageToVideoEncode, "Wan Image to Video Encode"),
    ("SlipstreamMultiTalkEmbeds", wan_multitalk.WanMultiTalkEmbeds, "Wan MultiTalk Audio Embeds"),
    ("SlipstreamWanDecode", wan_encoders.WanDecode, "Wan Decode"),
    ("SlipstreamWanVaceEncode", wan_conditioning.WanVaceEncode, "Wan VACE Encode"),
    ("SlipstreamWanFunControlEncode", wan_conditioning.WanFunControlEncode, "Wan Fun Control Encode"),
    ("SlipstreamWanFunInpaintEncode", wan_conditioning.WanFunInpaintEncode, "Wan Fun InP Encode"),
    ("SlipstreamWanPhantomSubjectEncode", wan_conditioning.WanPhantomSubjectEncode, "Wan Phantom Subject Encode"),
    ("SlipstreamWanTextEmbedsFromConditioning", wan_bridges.WanTextEmbedsFromConditioning,
     "Wan Text Embeds from Conditioning"),
    ("SlipstreamWanSpeechModelLoader", wan_speech.WanSpeechModelLoader,
     "Wan Speech Model Loader (MultiTalk / InfiniteTalk / FantasyTalking)"),
    ("SlipstreamWanSpeechLongVideo", wan_speech.WanSpeechLongVideo, "Wan Speech Long Video (MultiTalk / InfiniteTalk)"),
    ("SlipstreamWanClipEmbedsFromVisionOutput", wan_bridges.WanClipEmbedsFromVisionOutput,
     "Wan CLIP Embeds from CLIP Vision Output"),
    ("SlipstreamWanToCoreModel", wan_core.WanToCoreModel, "Wan Model to core MODEL"),
    # audio (speech encoders for the talking-head Wan families)
    ("SlipstreamSpeechEncoderLoader", audio.SlipstreamSpeechEncoderLoader, "Load Speech Encoder (wav2vec2)"),
    # int8 family
    ("OTUNetLoaderW8A8", quant.LoadDiffusionModelInt8, "Load Diffusion Model INT8 (W8A8)"),
    ("SlipstreamSaveInt8Model", quant.SaveInt8Model, "Save INT8 Model"),
]

NODE_CLASS_MAPPINGS: dict[str, type] = {node_id: cls for node_id, cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {node_id: name for node_id, _, name in NODES}

if len(NODE_CLASS_MAPPINGS) != len(NODES):
    raise RuntimeError("duplicate node id in nodes/__init__.py")
