"""Wan conditioning nodes for the control models: VACE (control video, mask, reference images),
Fun Control (control video + start image + reference image), Fun InP (start and/or end image) and
Phantom (subject images, with Phantom's separate subject guidance).

Each node returns SLIP_WAN_IMAGE_EMBEDS for the Wan Sampler, like Wan Image to Video Encode; the
work happens in models/wan/conditioning.py.
"""

from __future__ import annotations

from ..host import ProgressBar, compute_device
from ..models.wan.conditioning import fun_control_embeds, fun_inpaint_embeds, phantom_embeds, vace_embeds
from ..models.wan.encoders import require_images
from .wan import CATEGORY
from .wan_encoders import _size_inputs, _tiling, _valid_size


class WanVaceEncode:
    DESCRIPTION = ("Prepares a VACE generation (Wan 2.1 VACE 1.3B/14B, Wan 2.2 Fun-VACE): the control video "
                   "(depth, pose, edges, or a clip to edit), split by the mask into the part to keep and the "
                   "part to generate, plus reference images the video should show. Chain several through "
                   "'prev_embeds' to combine controls, each with its own strength. Reference images are "
                   "extra latent frames at the start that the sampler cuts off again.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIP_WAN_IMAGE_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("VACE conditioning for the Wan Sampler (with a VACE model), or for the next Wan VACE "
                       "Encode of a chain.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("SLIP_WAN_VAE", {"tooltip": "From Wan VAE Loader."}),
            **_size_inputs(),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                   "tooltip": "How strongly this control steers the video (the official "
                                              "context_scale); 0 turns it off."}),
            "force_offload": ("BOOLEAN", {"default": True, "tooltip": "Send the VAE back to RAM afterwards."}),
            "tiled_vae": ("BOOLEAN", {"default": False, "tooltip": "Encode in tiles (for very large frames)."}),
        }, "optional": {
            "control_video": ("IMAGE", {"tooltip": "Frames the video follows, at least num_frames of them (the "
                                                   "first num_frames are used), with the same aspect ratio as "
                                                   "width x height. Without it: a grey clip (no control)."}),
            "control_masks": ("MASK", {"tooltip": "White (1) where the model generates, black (0) where the "
                                                  "control video is kept as it is. One mask per frame, or one "
                                                  "for all frames, the control video's size. Without it: "
                                                  "generate everywhere."}),
            "reference_images": ("IMAGE", {"tooltip": "Subjects or a style the video should show; each image is "
                                                      "fitted onto a white canvas of the video's size."}),
            "prev_embeds": ("SLIP_WAN_IMAGE_EMBEDS", {"tooltip": "The output of another Wan VACE Encode with the "
                                                                 "same size and frames, to add this control to."}),
        }}

    def encode(self, vae, width, height, num_frames, strength, force_offload, tiled_vae, control_video=None,
               control_masks=None, reference_images=None, prev_embeds=None) -> tuple:
        width, height, num_frames = _valid_size(width, height, num_frames)
        refs = 0 if reference_images is None else reference_images.shape[0]
        bar = ProgressBar(2 * ((num_frames - 1) // 4 + 1) + refs)
        try:
            embeds = vace_embeds(vae, width, height, num_frames, compute_device(), strength,
                                 control_video=control_video, control_masks=control_masks,
                                 reference_images=reference_images, previous=prev_embeds, offload=force_offload,
                                 tiling=_tiling(tiled_vae, 512, 64), progress=bar.update_absolute)
        finally:
            bar.close()
        return (embeds,)


class WanFunControlEncode:
    DESCRIPTION = ("Prepares a Wan Fun Control generation (Wan 2.1 Fun 1.3B/14B Control and Fun V1.1 Control, Wan "
                   "2.2 Fun A14B Control): the control video (depth, pose, edges …) and an optional start image, "
                   "VAE-encoded side by side, as core's WanFunControlToVideo / Wan22FunControlToVideo, plus an "
                   "optional reference image for the models with a reference adapter (Fun V1.1, Wan 2.2 Fun). "
                   "Without a start image (or its CLIP embeds) the model gets zero image features, and without "
                   "a reference image a zero reference frame, as the Fun reference code does.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIP_WAN_IMAGE_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Fun Control conditioning for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("SLIP_WAN_VAE", {"tooltip": "From Wan VAE Loader."}),
            **_size_inputs(),
            "force_offload": ("BOOLEAN", {"default": True, "tooltip": "Send the VAE back to RAM afterwards."}),
            "tiled_vae": ("BOOLEAN", {"default": False, "tooltip": "Encode in tiles (for very large frames)."}),
        }, "optional": {
            "control_video": ("IMAGE", {"tooltip": "Frames the video follows, at least num_frames of them, with "
                                                   "the same aspect ratio as width x height."}),
            "start_image": ("IMAGE", {"tooltip": "The first frame of the video (optional)."}),
            "clip_embeds": ("SLIP_WAN_CLIP_EMBEDS", {"tooltip": "From Wan CLIP Vision Encode of the start image "
                                                                "(optional)."}),
            "ref_image": ("IMAGE", {"tooltip": "An image whose subject and look the video should take (Fun V1.1 "
                                               "Control and Wan 2.2 Fun A14B Control only; the first image is "
                                               "used, centre-cropped to the video's shape). Other Fun models "
                                               "refuse it."}),
        }}

    def encode(self, vae, width, height, num_frames, force_offload, tiled_vae, control_video=None, start_image=None,
               clip_embeds=None, ref_image=None) -> tuple:
        width, height, num_frames = _valid_size(width, height, num_frames)
        bar = ProgressBar((num_frames - 1) // 4 + 1)
        try:
            embeds = fun_control_embeds(vae, width, height, num_frames, compute_device(), control_video, start_image,
                                        clip_embeds, offload=force_offload, tiling=_tiling(tiled_vae, 512, 64),
                                        progress=bar.update_absolute, ref_image=ref_image)
        finally:
            bar.close()
        return (embeds,)


class WanFunInpaintEncode:
    DESCRIPTION = ("Prepares a Wan Fun InP generation (Wan 2.1 Fun 1.3B/14B InP, Wan 2.2 Fun A14B InP), as core's "
                   "WanFunInpaintToVideo: an optional start image and an optional end image become the known "
                   "first and last frames behind the frame mask; with neither the model makes the video from "
                   "the text alone. Works for I2V models too (FLF2V needs both images' CLIP embeds).")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIP_WAN_IMAGE_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Fun InP conditioning for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("SLIP_WAN_VAE", {"tooltip": "From Wan VAE Loader (the Wan 2.1 VAE)."}),
            **_size_inputs(),
            "force_offload": ("BOOLEAN", {"default": True, "tooltip": "Send the VAE back to RAM afterwards."}),
            "tiled_vae": ("BOOLEAN", {"default": False, "tooltip": "Encode in tiles (for very large frames)."}),
        }, "optional": {
            "start_image": ("IMAGE", {"tooltip": "The first frame of the video (optional)."}),
            "end_image": ("IMAGE", {"tooltip": "The last frame of the video (optional); the same size as the start "
                                               "image when both are given."}),
            "clip_embeds": ("SLIP_WAN_CLIP_EMBEDS", {"tooltip": "From Wan CLIP Vision Encode of the start image, "
                                                                "for Wan 2.1 Fun InP models (optional: zero "
                                                                "features without it). Wan 2.2 A14B has no CLIP."}),
        }}

    def encode(self, vae, width, height, num_frames, force_offload, tiled_vae, start_image=None, end_image=None,
               clip_embeds=None) -> tuple:
        for name, image in (("start_image", start_image), ("end_image", end_image)):
            if image is not None:
                require_images(image, name)
        width, height, num_frames = _valid_size(width, height, num_frames)
        bar = ProgressBar((num_frames - 1) // 4 + 1)
        try:
            embeds = fun_inpaint_embeds(vae, width, height, num_frames, compute_device(), start_image, end_image,
                                        clip_embeds, offload=force_offload, tiling=_tiling(tiled_vae, 512, 64),
                                        progress=bar.update_absolute)
        finally:
            bar.close()
        return (embeds,)


class WanPhantomSubjectEncode:
    DESCRIPTION = ("Prepares a Phantom subject-to-video generation (Phantom-Wan 1.3B/14B, loaded like a T2V "
                   "model): the subject images are encoded one latent frame each and shown to the model after "
                   "the video's frames, with empty frames for the negative prompt, as core's "
                   "WanPhantomSubjectToVideo. subject_cfg > 0 guides subject and text separately (Phantom's "
                   "official three-pass guidance; the sampler's cfg is then the text scale).")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIP_WAN_IMAGE_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Phantom conditioning for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("SLIP_WAN_VAE", {"tooltip": "From Wan VAE Loader."}),
            "images": ("IMAGE", {"tooltip": "The subjects (1-4 images); each is fitted onto a white canvas of the "
                                            "video's size."}),
            **_size_inputs(),
            "force_offload": ("BOOLEAN", {"default": True, "tooltip": "Send the VAE back to RAM afterwards."}),
        }, "optional": {
            "subject_cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                      "tooltip": "Phantom's subject guidance scale. 0: one cfg for text and subject "
                                                 "(two model passes per step). Above 0: three passes per step, "
                                                 "the sampler's cfg guides the text and this the subject (the "
                                                 "official recipe: subject_cfg 5.0 with cfg 7.5)."}),
        }}

    def encode(self, vae, images, width, height, num_frames, force_offload, subject_cfg=0.0) -> tuple:
        width, height, num_frames = _valid_size(width, height, num_frames)
        bar = ProgressBar(max(1, images.shape[0]))
        try:
            embeds = phantom_embeds(vae, width, height, num_frames, compute_device(), images, offload=force_offload,
                                    progress=bar.update_absolute, subject_cfg=subject_cfg)
        finally:
            bar.close()
        return (embeds,)
