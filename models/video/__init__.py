"""Frames to gif, webp, mp4 and webm through ffmpeg, one frame at a time.

formats.py describes each output format as data; ffmpeg.py finds and probes the ffmpeg binary;
frames.py checks an IMAGE batch and turns one frame at a time into the bytes ffmpeg reads;
audio.py writes an AUDIO value as raw samples cut or padded to the video's length; command.py
builds ffmpeg command lines from a format; process.py runs ffmpeg with frames streamed into its
stdin; encode.py ties them together; metadata.py writes the workflow into files.
Pure torch + numpy + Pillow: progress and interruption arrive as callbacks, never through host/.
"""
