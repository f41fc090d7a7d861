"""Video Combine throughput and memory: 81 frames at 480×832 (Wan 2.1's 480p) to gif, mp4 and webm.

Each measurement runs in a fresh subprocess so its peak RSS belongs to that encode alone. Reported per run:
frames/s (output frames / wall time), the Python process's peak RSS and its growth over the RSS it had with
the input batch already in memory (what encoding added), ffmpeg's own peak RSS, and the file size.

Baselines, same machine, same run, same ffmpeg binary:
  gif       Pillow save_all over a list of all frames (the well-known Video Combine's image/gif path,
            also how core's animated savers work);
  mp4/webm  imageio-ffmpeg write_frames, one frame at a time, with the well-known Video Combine's format
            arguments (h264: crf 19 yuv420p; webm: vp9 crf 20 -b:v 0 at libvpx's default speed).
A third run encodes 3× the frames with our encoder: its growth should equal the 81-frame growth.

Run under the shared lock so heavy jobs do not overlap:
    python benchmarks/video_combine.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

from _common import MIB, import_package, peak_rss_bytes, print_table, run_child

FORMATS = {"gif": "image/gif", "mp4": "video/h264-mp4", "webm": "video/vp9-webm"}


def make_frames(n: int, height: int, width: int):
    """A moving gradient with a moving disk and light noise: compressible, but not trivially."""
    import torch

    gen = torch.Generator().manual_seed(0)
    frames = torch.empty(n, height, width, 3)
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    for i in range(n):
        t = i / max(n - 1, 1)
        frames[i, ..., 0] = (xs + t) % 1.0
        frames[i, ..., 1] = ys * (1 - t) + t * xs
        frames[i, ..., 2] = 0.5 + 0.5 * torch.sin(6.28 * (xs * 2 + ys + t))
        cy, cx = height * (0.3 + 0.4 * t), width * t
        disk = ((torch.arange(height).view(-1, 1) - cy) ** 2 + (torch.arange(width).view(1, -1) - cx) ** 2) < (height / 6) ** 2
        frames[i][disk] = torch.tensor([1.0, 0.9, 0.2])
        frames[i].add_(torch.randn(height, width, 3, generator=gen) * 0.02).clamp_(0, 1)
    return frames


def _to_uint8(frame):
    import torch

    return (frame * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def run_ours(frames, fmt: str, out: str, frame_rate: float) -> None:
    import_package()
    from slipstream.models.video.encode import EncodeSettings, encode_frames

    encode_frames(frames, EncodeSettings(FORMATS[fmt], frame_rate), out)


def run_baseline(frames, fmt: str, out: str, frame_rate: float) -> None:
    if fmt == "gif":
        from PIL import Image

        images = [Image.fromarray(_to_uint8(f)) for f in frames]
        images[0].save(out, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 / frame_rate), loop=0, disposal=2)
        return
    import imageio_ffmpeg

    args = {"mp4": dict(codec="libx264", pix_fmt_out="yuv420p", output_params=["-crf", "19"]),
            "webm": dict(codec="libvpx-vp9", pix_fmt_out="yuv420p", output_params=["-crf", "20", "-b:v", "0"])}[fmt]
    n, height, width, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(out, (width, height), fps=frame_rate, quality=None, macro_block_size=1,
                                         ffmpeg_log_level="error", **args)
    writer.send(None)
    for frame in frames:
        writer.send(_to_uint8(frame))
    writer.close()


class ChildPeak:
    """Polls the RSS of this process's children (ffmpeg). getrusage(RUSAGE_CHILDREN) cannot be used: it
    charges a forked child with the parent's pages it held before exec."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self.peak = 0
        self._me = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in self._me.children(recursive=True):
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(self._interval)

    def __enter__(self) -> ChildPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(impl: str, fmt: str, n: int, height: int, width: int, frame_rate: float) -> dict:
    import psutil

    frames = make_frames(n, height, width)
    if impl == "ours":
        import_package()
        from slipstream.models.video.ffmpeg import find_ffmpeg

        find_ffmpeg()   # probed once per process (ComfyUI does it when listing nodes); not part of the encode
    rss_input = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory(prefix="slip-bench-") as tmp:
        out = os.path.join(tmp, f"bench.{fmt}")
        with ChildPeak() as ffmpeg_rss:
            start = time.perf_counter()
            (run_ours if impl == "ours" else run_baseline)(frames, fmt, out, frame_rate)
            seconds = time.perf_counter() - start
        size = os.path.getsize(out)
    peak = peak_rss_bytes()
    ffmpeg_peak = ffmpeg_rss.peak
    return {"impl": impl, "format": fmt, "frames": n, "seconds": seconds, "fps": n / seconds,
            "input_mib": frames.numel() * 4 / MIB, "peak_mib": peak / MIB, "growth_mib": (peak - rss_input) / MIB,
            "ffmpeg_peak_mib": ffmpeg_peak / MIB, "file_mib": size / MIB}


def measure(impl: str, fmt: str, n: int, args) -> dict:
    return run_child(__file__, "--child", impl, fmt, str(n), "--height", str(args.height), "--width", str(args.width),
                     "--frame-rate", str(args.frame_rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frame-rate", type=float, default=16.0)
    parser.add_argument("--formats", default="gif,mp4,webm")
    parser.add_argument("--scale", type=int, default=3, help="also encode this many times the frames (0 = skip)")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "FORMAT", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, fmt, n = args.child
        print(json.dumps(child(impl, fmt, int(n), args.height, args.width, args.frame_rate)))
        return

    import_package()
    from slipstream.models.video.ffmpeg import find_ffmpeg

    print(f"Video Combine benchmark: {args.frames} frames of {args.width}×{args.height} (W×H), float32 input "
          f"{args.frames * args.height * args.width * 12 / MIB:.0f} MiB, {args.frame_rate:g} fps, "
          f"{os.cpu_count()} CPU cores")
    print(f"ffmpeg: {find_ffmpeg().describe()}")
    rows, ratios = [], []
    for fmt in args.formats.split(","):
        runs = [("ours", measure("ours", fmt, args.frames, args)),
                ("baseline", measure("baseline", fmt, args.frames, args))]
        if args.scale:
            runs.append((f"ours ×{args.scale} frames", measure("ours", fmt, args.frames * args.scale, args)))
        rows += [(fmt, label, r["frames"], r["seconds"], r["fps"], r["peak_mib"], r["growth_mib"],
                  r["ffmpeg_peak_mib"], r["file_mib"]) for label, r in runs]
        ours, base = runs[0][1], runs[1][1]
        scaled = f" ({runs[2][1]['growth_mib']:.0f} MiB at ×{args.scale} frames)" if args.scale else ""
        ratios.append(f"{fmt:6} speed ours/baseline {ours['fps'] / base['fps']:5.2f}×   Python memory added: "
                      f"ours {ours['growth_mib']:.0f} MiB{scaled}, baseline {base['growth_mib']:.0f} MiB")
    print_table(["format", "run", "frames", "s", "frames/s", "py peak MiB", "py +MiB", "ffmpeg MiB", "file MiB"],
                rows, ["", "", "d", ".2f", ".1f", ".0f", ".0f", ".0f", ".2f"])
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
