"""Speech-driven Wan nodes: the speech model loader (MultiTalk / InfiniteTalk, FantasyTalking) and the
streaming long-video sampler.

A speech model is two things in the graph: the loader node below names the file (and its family,
read from the key names) and the Wan Model Loader attaches it while loading, so quantization and
block swap cover its weights. Audio embeds come from the families' embeds nodes; the Wan Sampler
takes them for one clip, Wan Speech Long Video for any length (it decodes each clip to continue from
its last frames, so it outputs frames, not a latent).
"""

from __future__ import annotations

from ..host import ProgressBar, check_interrupt, compute_device, list_models, model_path, soft_empty_cache
from ..models.finite import finite_number
from ..models.gguf_file import is_gguf
from ..models.wan.denoiser import SamplingExtras
from ..models.wan.pipeline import SamplerSettings
from ..models.wan.sampling import SCHEDULERS
from ..models.wan.speech_models import describe_speech_model
from ..models.wan.streaming import STREAM_MODES, StreamSettings, stream_speech_video
from .wan import CATEGORY, SPEECH_SAMPLER_INPUTS

SPEECH_MODEL = "SLIPSTREAM_WAN_SPEECH_MODEL"


class WanSpeechModelLoader:
    DESCRIPTION = ("Picks a speech model for the Wan Model Loader: MultiTalk (one or two speakers), InfiniteTalk "
                   "(MultiTalk's long-video successor, the same layout) or FantasyTalking. The family is read from the "
                   "file's key names; the weights are loaded by the Wan Model Loader, which adds them to a Wan 2.1 "
                   "I2V 14B model before quantization and block swap.")
    CATEGORY = CATEGORY
    FUNCTION = "pick"
    RETURN_TYPES = (SPEECH_MODEL,)
    RETURN_NAMES = ("speech_model",)
    OUTPUT_TOOLTIPS = ("The speech model file and its family, for the Wan Model Loader's speech_model input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = [f for f in list_models("diffusion_models") if not is_gguf(f)]
        return {"required": {
            "model": (files or ["(no models found)"],
                      {"tooltip": "Speech model file from models/diffusion_models, e.g. multitalk.safetensors, "
                                  "infinitetalk_single.safetensors or fantasytalking_model.ckpt."}),
        }}

    def pick(self, model) -> tuple:
        return (describe_speech_model(model_path("diffusion_models", model), model.rsplit("/", 1)[-1]),)


class WanSpeechLongVideo:
    DESCRIPTION = ("Makes a talking video of any length with MultiTalk or InfiniteTalk (their streaming mode): clips "
                   "of the image embeds' length, each continuing from the last motion_frames decoded frames of the "
                   "one before on its own stretch of the audio. The overlap is dropped from the later clip, as "
                   "officially; exactly num_frames frames come out. Decodes every clip (it needs the frames to "
                   "continue), so it outputs images: connect Video Combine with the embeds node's audio.")
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The video frames [num_frames, H, W, 3] in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("SLIP_WAN_MODEL", {"tooltip": "A Wan 2.1 I2V model with the MultiTalk / InfiniteTalk speech "
                                                    "model attached (Wan Model Loader's speech_model)."}),
            "vae": ("SLIP_WAN_VAE", {"tooltip": "The Wan 2.1 VAE: decodes each clip and encodes its last frames "
                                                "for the next."}),
            "image_embeds": ("SLIP_WAN_IMAGE_EMBEDS", {"tooltip": "Wan Image to Video Encode of the start image; its "
                                                                  "num_frames is the clip length (81 official)."}),
            "text_embeds": ("SLIP_WAN_TEXT_EMBEDS", {"tooltip": "From Wan Text Encode."}),
            "audio_embeds": (SPEECH_SAMPLER_INPUTS["audio_embeds"][0], {
                "tooltip": "From the MultiTalk embeds node; its num_frames must cover the whole video."}),
            "num_frames": ("INT", {"default": 0, "min": 0, "max": 100000, "step": 1,
                                   "tooltip": "Frames of the whole video; 0 = as many as the audio embeds cover."}),
            "motion_frames": ("INT", {"default": 25, "min": 1, "max": 1000, "step": 4,
                                      "tooltip": "Frames each clip shares with the one before (1 + 4k; official 25). "
                                                 "More: smoother joins, fewer new frames per clip."}),
            "mode": (["auto", *STREAM_MODES], {"default": "auto",
                                               "tooltip": "multitalk: each clip is conditioned on the motion frames "
                                                          "(the MultiTalk way). infinitetalk: on the start image as "
                                                          "reference, with the motion frames held in the latent "
                                                          "(InfiniteTalk models). auto: infinitetalk for a file "
                                                          "named infinitetalk*, else multitalk."}),
            "steps": ("INT", {"default": 40, "min": 1, "max": 1000, "step": 1,
                              "tooltip": "Denoising steps per clip (official 40)."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.01,
                              "tooltip": "Prompt guidance (official 5). 1.0 skips the negative prompt."}),
            "audio_cfg": SPEECH_SAMPLER_INPUTS["audio_cfg"],
            "shift": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                "tooltip": "Noise schedule shift (official 7 at 480p, 11 at 720p)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Noise seed of the first clip; clip k uses seed + k."}),
            "scheduler": (list(SCHEDULERS), {"default": "unipc", "tooltip": "Solver and schedule, as in Wan Sampler."}),
            "force_offload": ("BOOLEAN", {"default": True,
                                          "tooltip": "Move the model to RAM while the VAE works and after the run."}),
        }, "optional": {
            "clip_vision": ("SLIP_WAN_CLIP_VISION", {
                "tooltip": "multitalk mode: re-encode each clip's last motion frame with CLIP (official). Empty: "
                           "every clip uses the start image's CLIP tokens."}),
        }}

    def generate(self, model, vae, image_embeds, text_embeds, audio_embeds, num_frames, motion_frames, mode, steps,
                 cfg, audio_cfg, shift, seed, scheduler, force_offload, clip_vision=None) -> tuple:
        total = int(num_frames) or int(getattr(audio_embeds, "num_frames", 0))
        if mode == "auto":
            variant = getattr(getattr(model.dit, "audio_adapter", None), "variant", "multitalk")
            mode = variant if variant in STREAM_MODES else "multitalk"
        stream = StreamSettings(total, int(motion_frames), mode)
        settings = SamplerSettings(steps, cfg, shift, seed, scheduler, 1.0, "off")
        extras = SamplingExtras(audio_cfg=finite_number("audio_cfg", audio_cfg, "Wan Speech Long Video"))
        bar = ProgressBar(steps)
        try:
            frames = stream_speech_video(model, text_embeds, image_embeds, audio_embeds, settings, stream, vae=vae,
                                         device=compute_device(), clip_vision=clip_vision, extras=extras,
                                         force_offload=force_offload, progress=bar.update_absolute,
                                         check_interrupt=check_interrupt)
        finally:
            bar.close()
            if force_offload:
                soft_empty_cache()
        return (frames,)
