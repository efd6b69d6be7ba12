"""The one video decoder and frame sampler, the same in training and serving: decord decodes the
file, ``sample_frame_indices`` picks the frames. PyAV writes test and demo videos and, here, reads
a file's container header for its frame size (decord can tell it only by decoding a frame, and a
tiny file can declare frames of gigabytes); it decodes no frame for us.

A model trained on frames sampled one way and served on frames sampled another would lose
accuracy silently, so serving (serving/media.py) and the trainer (adapters/training/batches.py)
both call ``read_video``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
VIDEO_FRAMES = 8          # frames sampled per video (VL-Adapter's video setting)
_DECODE_THREADS = 1       # requests already decode in parallel; don't oversubscribe


class VideoError(ValueError):
    """A file that is not a decodable video; ``code`` names why ("empty_video": no frames,
    "unsupported_video": not a container/stream decord can read, or its frames fail)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int


def frame_size(path: str | Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the first video stream from the container header. The probe's decoder
    refuses frames over ``max_pixels``, so a file that declares huge frames costs nothing: its
    VideoError "video_too_large" comes before any frame is decoded."""
    import av
    try:
        with av.open(str(path), stream_options=[{"max_pixels": str(max_pixels)}]) as container:
            if not container.streams.video:
                raise VideoError("unsupported_video", "no video stream")
            ctx = container.streams.video[0].codec_context
            width, height = ctx.width, ctx.height
    except av.FFmpegError as e:
        log.info("cannot read the header of %s: %s", path, e)
        raise VideoError("unsupported_video", "unknown container format or no video stream") \
            from None
    if width * height > max_pixels:
        raise VideoError("video_too_large", f"frames are {width}x{height} pixels; the limit is "
                         f"{max_pixels} pixels per frame")
    return width, height


def sample_frame_indices(total: int, num: int) -> list[int]:
    """``num`` frame indices spread uniformly over ``total`` frames: the centre of each of ``num``
    equal segments. Non-decreasing; strictly increasing when total >= num (shorter videos repeat
    frames)."""
    return [((2 * i + 1) * total) // (2 * num) for i in range(num)]


def sample_frames(frames: np.ndarray, num: int) -> np.ndarray:
    """``num`` of an array of frames (T, H, W, 3), sampled as a video file's would be."""
    return frames[sample_frame_indices(len(frames), num)]


def read_video(path: str | Path, num: int = VIDEO_FRAMES, max_frame_pixels: int = 1 << 26,
               check: Callable[[VideoInfo], None] | None = None) -> np.ndarray:
    """(num, H, W, 3) uint8 RGB frames sampled uniformly over the whole video at ``path``.

    Frames over ``max_frame_pixels`` are refused from the header (``frame_size``). ``check(info)``
    runs once the frame count, rate and size are known and before any frame is decoded (serving
    refuses long videos there). Raises VideoError."""
    import decord  # a hard dependency; imported here so model-free processes skip it
    width, height = frame_size(path, max_frame_pixels)
    try:
        reader = decord.VideoReader(str(path), num_threads=_DECODE_THREADS)
    except AssertionError:  # decord asserts frame count > 0
        raise VideoError("empty_video", "the video has no frames") from None
    except Exception as e:  # noqa: BLE001 - decord raises its own untyped errors
        log.info("decord cannot open %s: %s", path, e)
        raise VideoError("unsupported_video", "unknown container format or no video stream") \
            from None
    if len(reader) == 0:    # in case asserts are compiled out (python -O)
        raise VideoError("empty_video", "the video has no frames")
    if check is not None:
        check(VideoInfo(len(reader), reader.get_avg_fps(), width, height))
    try:
        return reader.get_batch(sample_frame_indices(len(reader), num)).asnumpy()
    except Exception as e:  # noqa: BLE001
        log.info("decord cannot decode %s: %s", path, e)
        raise VideoError("unsupported_video", "its frames cannot be decoded") from None
