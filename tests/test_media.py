"""Tests for serving/media.py: base64, images (formats, modes, bombs), videos."""

from __future__ import annotations

import base64
import io
import os
import random
import struct
import sys
import time
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from petserve.adapters.data import video
from petserve.adapters.data.video import sample_frame_indices
from petserve.serving.errors import ApiError
from petserve.serving.media import (
    MediaLimits,
    decode_base64,
    decode_image,
    decode_video,
)

LIMITS = MediaLimits()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 32, h: int = 24) -> Image.Image:
    x = np.arange(w, dtype=np.uint8)[None, :].repeat(h, 0) * 7
    y = np.arange(h, dtype=np.uint8)[:, None].repeat(w, 1) * 9
    return Image.fromarray(np.stack([x, y, x // 2 + y // 2], -1), "RGB")


def pixels(im: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(p) for p in np.asarray(im).reshape(-1, len(im.getbands())).tolist()]


def raises(status: int, code: str, fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args, **kw)
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    return e.value


# --- base64 -----------------------------------------------------------------


def test_base64_plain_data_url_and_line_breaks() -> None:
    raw = os.urandom(300)
    text = base64.b64encode(raw).decode()
    assert decode_base64(text, field="image", max_bytes=300) == raw
    assert decode_base64("data:image/png;base64," + text, field="image", max_bytes=300) == raw
    assert decode_base64("DATA:;BASE64," + text, field="image", max_bytes=300) == raw
    mime = base64.encodebytes(raw).decode()  # a line break every 76 characters
    assert decode_base64(mime, field="image", max_bytes=300) == raw


@pytest.mark.parametrize(
    "text, words",
    [("", "empty"), ("abc", "multiple of 4"), ("ab$d", "'$' at position 2"),
     ("YW=j", "padding"), ("YWJj-_==", "'-' at position 4"), ("data:image/png,abcd", "data URL"),
     ("data:image/png;base64", "data URL")],
)
def test_base64_rejects(text: str, words: str) -> None:
    err = raises(400, "invalid_base64", decode_base64, text, field="image", max_bytes=100)
    assert err.message.startswith("image: ") and words in err.message


def test_base64_size_checked_before_decoding() -> None:
    raw = bytes(101)
    text = base64.b64encode(raw).decode()
    raises(413, "payload_too_large", decode_base64, text, field="image", max_bytes=100)
    assert len(decode_base64(text, field="image", max_bytes=101)) == 101
    # Junk that would be a 400 if it were decoded is refused for its length.
    raises(413, "payload_too_large", decode_base64, "$" * 10**6, field="video", max_bytes=1000)


# --- images -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, kw, exact",
    [("PNG", {}, True), ("BMP", {}, True), ("WEBP", {"lossless": True}, True),
     ("JPEG", {"quality": 95}, False), ("GIF", {}, False)],
)
def test_image_round_trips(fmt: str, kw: dict, exact: bool) -> None:
    src = gradient()
    im = decode_image(encode(src, fmt, **kw), LIMITS)
    assert (im.mode, im.size) == ("RGB", src.size)
    diff = np.abs(np.asarray(im, np.int16) - np.asarray(src, np.int16))
    assert diff.max() == 0 if exact else diff.mean() < 12


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert decode_image(data, LIMITS).getpixel((3, 3)) == (255, 0, 0)


def test_alpha_goes_onto_white() -> None:
    src = Image.new("RGBA", (4, 1))
    src.putdata([(10, 20, 30, 255), (10, 20, 30, 0), (0, 0, 0, 128), (200, 0, 0, 255)])
    px = pixels(decode_image(encode(src, "PNG"), LIMITS))
    assert px[0] == (10, 20, 30) and px[1] == (255, 255, 255) and px[3] == (200, 0, 0)
    assert all(126 <= c <= 128 for c in px[2])
    la = Image.new("LA", (2, 2), (0, 0))
    assert decode_image(encode(la, "PNG"), LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency() -> None:
    src = Image.new("P", (2, 1))
    src.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    src.putdata([0, 1])
    im = decode_image(encode(src, "PNG", transparency=1), LIMITS)
    assert pixels(im) == [(255, 0, 0), (255, 255, 255)]
    assert decode_image(encode(src, "GIF"), LIMITS).getpixel((1, 0)) == (0, 255, 0)


def test_grey_cmyk_and_16_bit() -> None:
    assert decode_image(encode(Image.new("L", (3, 3), 77), "PNG"), LIMITS).getpixel((1, 1)) == (77,) * 3
    assert decode_image(encode(Image.new("1", (3, 3), 1), "BMP"), LIMITS).getpixel((0, 0)) == (255,) * 3
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), LIMITS)
    r, g, b = cmyk.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).convert("I;16")
    im = decode_image(encode(deep, "PNG"), LIMITS)
    assert [p[0] for p in pixels(im)] == [0, 128, 255]


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(gradient(32, 24), "JPEG", exif=exif)
    assert decode_image(data, LIMITS).size == (24, 32)


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A 1-bit greyscale PNG; `rows` defaults to all-black, streamed into zlib
    a row at a time so a 20000x20000 image costs a few KB and no big buffer."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    if rows is None:
        z, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
        rows = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header() -> None:
    assert decode_image(_png(16, 16), LIMITS).size == (16, 16)  # the generator is sound
    bomb = _png(20000, 20000)
    assert len(bomb) < 100_000
    start = time.perf_counter()
    err = raises(413, "image_too_large", decode_image, bomb, LIMITS)
    assert time.perf_counter() - start < 0.5 and err.message.startswith("image: ")
    # Under PIL's own threshold, but over ours (40 Mpx), and over the side limit.
    fake_idat = zlib.compress(b"")
    raises(413, "image_too_large", decode_image, _png(8000, 8000, fake_idat), LIMITS)
    err = raises(413, "image_too_large", decode_image, _png(9000, 10, fake_idat), LIMITS)
    assert "9000x10" in err.message
    raises(413, "image_too_large", decode_image, _png(100_000, 100_000, fake_idat), LIMITS)


def test_oversize_bytes() -> None:
    data = encode(gradient(), "PNG")
    err = raises(413, "payload_too_large", decode_image, data, MediaLimits(max_image_bytes=len(data) - 1))
    assert err.message.startswith("image: ")


def test_truncated_and_corrupt_images() -> None:
    jpeg = encode(gradient(64, 64), "JPEG")
    err = raises(400, "invalid_image", decode_image, jpeg[: len(jpeg) // 2], LIMITS, field="images[1]")
    assert err.message.startswith("images[1]: not a valid image")
    png = bytearray(encode(gradient(), "PNG"))
    png[60:70] = bytes(10)  # inside IDAT
    raises(400, "invalid_image", decode_image, bytes(png), LIMITS)
    raises(400, "invalid_image", decode_image, b"", LIMITS)


def test_unsupported_image_formats() -> None:
    junk = random.Random(0).randbytes(5000)
    err = raises(415, "unsupported_image_format", decode_image, junk, LIMITS)
    assert "cannot identify image file" in err.message
    raises(415, "unsupported_image_format", decode_image, encode(gradient(), "TIFF"), LIMITS)


# --- videos -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4() -> bytes:
    """20 frames at 10 fps; frame i is grey level 12*i, so frames name themselves."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"qp": "0"}
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 12 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def frame_ids(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean() / 12)) for f in frames]


def test_sample_frame_indices() -> None:
    assert sample_frame_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    assert sample_frame_indices(10, 10) == list(range(10))
    assert sample_frame_indices(1000, 1) == [500]


def test_video_uniform_sampling(mp4: bytes) -> None:
    frames = decode_video(mp4, LIMITS, 8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    ids = frame_ids(frames)
    assert ids == sample_frame_indices(20, 8)
    assert ids == sorted(set(ids))
    assert frame_ids(decode_video(mp4, LIMITS, 1)) == [10]
    assert frame_ids(decode_video(mp4, LIMITS, 30)) == sample_frame_indices(20, 30)


def test_video_limits(mp4: bytes) -> None:
    raises(400, "invalid_num_frames", decode_video, mp4, LIMITS, 0)
    raises(400, "invalid_num_frames", decode_video, mp4, LIMITS, 33)
    raises(400, "invalid_video", decode_video, b"", LIMITS, 4)
    raises(413, "payload_too_large", decode_video, mp4, MediaLimits(max_video_bytes=len(mp4) - 1), 4)
    err = raises(413, "video_too_long", decode_video, mp4, MediaLimits(max_video_seconds=1.5), 4)
    assert err.message.startswith("video: ")
    raises(413, "video_too_large", decode_video, mp4, MediaLimits(max_video_frame_pixels=64 * 47), 4)


def test_not_a_video(mp4: bytes) -> None:
    junk = random.Random(0).randbytes(20000)
    err = raises(415, "unsupported_video", decode_video, junk, LIMITS, 4, field="clip")
    assert err.message.startswith("clip: not a decodable video")
    raises(415, "unsupported_video", decode_video, b"hello " * 100, LIMITS, 4)
    raises(415, "unsupported_video", decode_video, mp4[: len(mp4) // 3], LIMITS, 4)


def test_zero_frame_video(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real zero-frame files fail to open in decord already; fake its two ways
    # of reporting one (an assert in VideoReader, or a length of 0).
    class Asserts:
        def __init__(self, *a, **kw) -> None:
            raise AssertionError("Invalid frame count: 0")

    class Empty:
        def __init__(self, *a, **kw) -> None:
            pass

        def __len__(self) -> int:
            return 0

    monkeypatch.setattr(video, "frame_size", lambda path, max_pixels: (8, 8))   # header passes
    for reader in (Asserts, Empty):
        monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=reader))
        raises(400, "empty_video", decode_video, b"\x00" * 100, LIMITS, 4)
