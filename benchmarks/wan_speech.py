"""Speech-driven Wan sampling costs, as ratios against the plain image-to-video step in the same run (CPU,
random weights).

1. Per step, a clip of 17 frames at 128×128 (5 latent frames, 320 tokens), prompt cfg 5 unless said:
   the plain I2V step (two passes; and batched, for reference) against MultiTalk and FantasyTalking
   with audio_cfg 1 (two passes: the adapter's own cost), audio_cfg 4 (the official three passes) and
   cfg 1 with audio_cfg 4 (two passes). Expect about 1.0x / 1.5x / 1.0x of the two-pass plain step
   plus the adapter's share; the adapter's share is the figure to watch.
2. Per streamed clip (MultiTalk): what continuing from the previous clip adds (the VAE encode of the
   motion frames among grey frames, the next clip's I2V conditioning), counted in sampling steps of
   the same clip; a 40-step official clip pays it once. The VAE is the demo VAE (narrow, full
   resolution), so only the order of magnitude carries over.

Model: a Wan 2.1 I2V DiT with the real structure at reduced width (dim 512, 4 blocks, 128-wide heads),
with MultiTalk / FantasyTalking speech weights for it (demo-sized projectors). Each figure is the
best process CPU time of several round-robin repetitions after a warm-up (--threads 1, the default:
CPU time is the work done whatever else the machine runs).

Run under the shared lock so heavy jobs do not overlap:
    python benchmarks/wan_speech.py [--repeats 3]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from _common import best_times, cpu_features, import_package, print_table

import_package()

import torch  # noqa: E402
from slipstream.models.wan import config as wan_config  # noqa: E402
from slipstream.models.wan.demo_speech_assets import (  # noqa: E402
    MULTITALK_FRAME_WIDTH,
    TINY_WAV2VEC2,
    tiny_fantasytalking_state_dict,
    tiny_multitalk_state_dict,
)
from slipstream.models.wan.dit import WanDiT, random_state_dict  # noqa: E402
from slipstream.models.wan.fantasytalking import FantasyTalkingConditioning  # noqa: E402
from slipstream.models.wan.multitalk_conditioning import MultiTalkConditioning, audio_windows  # noqa: E402
from slipstream.models.wan.pipeline import (  # noqa: E402
    SamplerSettings,
    SamplingExtras,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    sample_video_full,
)
from slipstream.models.wan.speech_models import load_speech_model  # noqa: E402

CPU = torch.device("cpu")
FRAMES, SIZE = 17, 128


def build(family: str | None) -> WanModelHandle:
    cfg = replace(wan_config.tiny("i2v", num_layers=4, text_dim=64, clip_dim=64), dim=512, ffn_dim=1024, num_heads=4,
                  text_len=32, name=f"bench-i2v-{family or 'plain'}")
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=0))
    if family == "multitalk":
        dit.attach_audio(load_speech_model("multitalk.safetensors", dit, state_dict=tiny_multitalk_state_dict(cfg)))
    elif family == "fantasytalking":
        dit.attach_audio(load_speech_model("fantasytalking.safetensors", dit,
                                           state_dict=tiny_fantasytalking_state_dict(cfg)))
    return WanModelHandle(dit, cfg.name, CPU)


def conditioning(family: str):
    g = torch.Generator().manual_seed(1)
    if family == "multitalk":
        per_frame = torch.randn(FRAMES + 3, TINY_WAV2VEC2.num_layers, MULTITALK_FRAME_WIDTH // TINY_WAV2VEC2.num_layers,
                                generator=g)
        return MultiTalkConditioning(audio_windows(per_frame, FRAMES)[None])
    tokens = int(FRAMES / 23.0 * 50) + 1                       # wav2vec2's 50 Hz over the clip at 23 fps
    return FantasyTalkingConditioning(torch.randn(1, tokens, TINY_WAV2VEC2.hidden_size, generator=g), FRAMES)


def inputs():
    g = torch.Generator().manual_seed(0)
    text = WanTextEmbeds((torch.randn(12, 64, generator=g),), torch.randn(8, 64, generator=g))
    lat = (FRAMES - 1) // 4 + 1
    y = torch.cat([torch.zeros(4, lat, SIZE // 8, SIZE // 8), torch.randn(16, lat, SIZE // 8, SIZE // 8, generator=g)])
    y[:4, 0] = 1
    return text, WanImageEmbeds(SIZE, SIZE, FRAMES, y=y, clip=torch.randn(1, 257, 64, generator=g))


def bench_steps(steps: int, repeats: int) -> list[tuple]:
    text, image = inputs()
    plain = build(None)
    variants = [("plain I2V, cfg 5, two passes (baseline)", plain, None, 5.0, 1.0, "off"),
                ("plain I2V, cfg 5, batched", plain, None, 5.0, 1.0, "on")]
    for family in ("multitalk", "fantasytalking"):
        handle, audio = build(family), conditioning(family)
        variants += [(f"{family}, audio_cfg 1 (2 passes)", handle, audio, 5.0, 1.0, "off"),
                     (f"{family}, audio_cfg 4 (3 passes)", handle, audio, 5.0, 4.0, "off"),
                     (f"{family}, cfg 1, audio_cfg 4 (2 passes)", handle, audio, 1.0, 4.0, "off")]
    runs = []
    for _, handle, audio, cfg, acfg, batched in variants:
        settings = SamplerSettings(steps=steps, cfg=cfg, shift=7.0, seed=1, batched_cfg=batched)
        extras = SamplingExtras(audio=audio, audio_cfg=acfg)
        runs.append(lambda h=handle, s=settings, e=extras: sample_video_full(h, text, image, s, device=CPU, extras=e,
                                                                             force_offload=False))
    times = best_times(runs, repeats)
    base = times[0] / steps
    return [(name, t / steps, t / steps / base) for (name, *_), t in zip(variants, times, strict=True)]


def bench_stream_clip(steps: int, repeats: int) -> list[tuple]:
    from slipstream.models.wan.demo_assets import tiny_vae_state_dict
    from slipstream.models.wan.encoders import WanVAEHandle
    from slipstream.models.wan.streaming import Clip, _next_embeds
    from slipstream.models.wan.vae import TINY_VAE, WanVAE

    text, image = inputs()
    handle, audio = build("multitalk"), conditioning("multitalk")
    vae_model = WanVAE(TINY_VAE).eval()
    vae_model.load_state_dict(tiny_vae_state_dict())
    vae = WanVAEHandle(vae_model, "tiny", CPU)
    previous = torch.rand(FRAMES, SIZE, SIZE, 3)
    clip = Clip(FRAMES - 5, FRAMES, 5, 5)
    settings = SamplerSettings(steps=steps, cfg=5.0, shift=7.0, seed=1, batched_cfg="off")
    extras = SamplingExtras(audio=audio, audio_cfg=4.0)

    def sample():
        sample_video_full(handle, text, image, settings, device=CPU, extras=extras, force_offload=False)

    def condition():
        _next_embeds("multitalk", image, clip, Clip(0, FRAMES, 0), previous, vae, None, CPU, False)

    clip_time, cond_time = best_times([sample, condition], repeats)
    per_step = clip_time / steps
    return [(f"sampling, {steps} steps of 3 passes", clip_time, steps),
            ("next clip's conditioning (VAE encode of motion + grey frames)", cond_time, cond_time / per_step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_features())
    print(f"torch {torch.__version__}, {args.threads} thread(s); model dim 512, 4 blocks; clip {FRAMES} frames "
          f"{SIZE}x{SIZE}; {args.steps} steps; best of {args.repeats}\n")
    print("1. Per step, against the plain I2V step (two passes)")
    print_table(["variant", "s/step", "x plain"], bench_steps(args.steps, args.repeats), ["", ".3f", ".2f"])
    print("\n2. One streamed MultiTalk clip: continuing from the previous clip, in sampling steps")
    print_table(["part", "s", "steps"], bench_stream_clip(args.steps, args.repeats), ["", ".3f", ".1f"])


if __name__ == "__main__":
    main()
