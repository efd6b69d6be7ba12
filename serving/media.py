"""Decoding of untrusted images and videos from HTTP requests.

Every function here either returns decoded media or raises ApiError with the
request field's name at the start of the message ("image: ..."). Limits are
checked as early as possible: byte sizes before decoding base64, pixel counts
from the image header before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from petserve.adapters.data.video import VideoError, VideoInfo, read_video
from petserve.serving.errors import ApiError

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # PIL plugin names we accept
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=]")
_WHITESPACE = re.compile(r"[ \t\r\n]+")


@dataclass(frozen=True)
class MediaLimits:
    """Per-request limits. max_video_frame_pixels (width*height of one frame)
    bounds the decoded array at num_frames * pixels * 3 bytes."""

    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # decompression-bomb guard (width*height)
    max_image_side: int = 8192
    max_video_bytes: int = 64 * 2**20
    max_video_frames_sampled: int = 32
    max_video_seconds: float = 600.0
    max_video_frame_pixels: int = 3840 * 2160


# --- base64 -----------------------------------------------------------------


def decode_base64(data: str, *, field: str, max_bytes: int) -> bytes:
    """Decode standard, padded base64, optionally as a "data:<type>;base64,"
    URL. ASCII whitespace (MIME line breaks) is ignored; any other character
    outside the alphabet is a 400. The decoded size is computed from the
    string's length, so an oversize payload is refused (413) before decoding.
    """
    if not isinstance(data, str):
        raise ApiError.bad_request("invalid_base64", f"{field}: expected a base64 string")
    payload = _strip_data_url(data, field)
    # Generous bound first (allows a line break every 76 chars) so that a huge
    # string is refused without copying it to strip whitespace.
    encoded_max = 4 * -(-max_bytes // 3)
    if len(payload) > encoded_max + encoded_max // 38 + 4:
        raise _too_large(field, max_bytes)
    if _WHITESPACE.search(payload):
        payload = _WHITESPACE.sub("", payload)
    if not payload:
        raise ApiError.bad_request("invalid_base64", f"{field}: is empty")
    if len(payload) % 4:
        raise ApiError.bad_request(
            "invalid_base64",
            f"{field}: invalid base64 (length {len(payload)} is not a multiple "
            "of 4; is the '=' padding missing?)",
        )
    if len(payload) // 4 * 3 - (len(payload) - len(payload.rstrip("="))) > max_bytes:
        raise _too_large(field, max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        bad = _NOT_B64.search(payload)
        reason = (
            f"character {bad.group()!r} at position {bad.start()} is not in the "
            "base64 alphabet" if bad else f"misplaced '=' padding ({e})"
        )
        raise ApiError.bad_request("invalid_base64", f"{field}: invalid base64 ({reason})") from None


def _strip_data_url(data: str, field: str) -> str:
    if data[:5].lower() != "data:":
        return data
    comma = data.find(",", 0, 1024)
    if comma < 0 or not data[5:comma].lower().endswith(";base64"):
        raise ApiError.bad_request(
            "invalid_base64",
            f"{field}: a data URL must look like 'data:<media type>;base64,<data>'",
        )
    return data[comma + 1:]


def _too_large(field: str, max_bytes: int) -> ApiError:
    return ApiError.payload_too_large(f"{field}: larger than the limit of {max_bytes} bytes")


# --- images -------------------------------------------------------------------


def decode_image(data: bytes, limits: MediaLimits, *, field: str = "image") -> Image.Image:
    """Decode one JPEG/PNG/WebP/BMP/GIF (first frame) into a loaded RGB image.

    Errors: empty or corrupt/truncated -> 400 invalid_image; other formats ->
    415 unsupported_image_format; too many bytes -> 413 payload_too_large; too
    many pixels -> 413 image_too_large (checked on the header, before
    decoding). EXIF orientation is applied; transparency goes onto white.
    """
    if not data:
        raise ApiError.bad_request("invalid_image", f"{field}: is empty")
    if len(data) > limits.max_image_bytes:
        raise _too_large(field, limits.max_image_bytes)
    im = _open_image(data, field, limits)
    try:
        im.load()  # Image.open is lazy: a truncated file fails only here
    except Image.DecompressionBombError as e:
        raise _image_too_large(field, str(e)) from None
    except Exception as e:  # PIL raises many types on corrupt data
        raise _invalid_image(field, e) from None
    return _to_rgb(im, field)


def _open_image(data: bytes, field: str, limits: MediaLimits) -> Image.Image:
    """Parse the header only, and refuse oversize dimensions."""
    try:
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise _image_too_large(field, str(e)) from None
    except UnidentifiedImageError:
        raise ApiError.unsupported_media(
            "unsupported_image_format",
            f"{field}: not a supported image (cannot identify image file; "
            "send JPEG, PNG, WebP, BMP or GIF)",
        ) from None
    except Exception as e:
        raise _invalid_image(field, e) from None
    width, height = im.size
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; we refuse.
    pixel_cap = min(limits.max_image_pixels, Image.MAX_IMAGE_PIXELS or limits.max_image_pixels)
    if width <= 0 or height <= 0:
        raise ApiError.bad_request("invalid_image", f"{field}: has no pixels ({width}x{height})")
    if max(width, height) > limits.max_image_side or width * height > pixel_cap:
        raise _image_too_large(
            field,
            f"{width}x{height} pixels; the limits are {limits.max_image_side} "
            f"per side and {pixel_cap} in total",
        )
    return im


def _to_rgb(im: Image.Image, field: str) -> Image.Image:
    """RGB copy of a loaded image, upright per EXIF, alpha composited on white."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:
        pass  # broken EXIF only costs us the rotation, not the image
    try:
        if im.mode.startswith("I") or im.mode == "F":
            im = _high_depth_to_l(im)
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return im if im.mode == "RGB" else im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ApiError.unsupported_media(
            "unsupported_image_format", f"{field}: cannot convert {im.mode} pixels to RGB ({e})"
        ) from None


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit "L". Integer modes are
    taken as 16-bit (what PNG stores); float as 0..255 (PIL's convention)."""
    values = np.asarray(im)
    if im.mode == "F":
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return Image.fromarray((np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8), "L")


def _image_too_large(field: str, detail: str) -> ApiError:
    return ApiError.payload_too_large(f"{field}: image too large ({detail})", code="image_too_large")


def _invalid_image(field: str, e: Exception) -> ApiError:
    return ApiError.bad_request("invalid_image", f"{field}: not a valid image ({e})")


# --- videos -------------------------------------------------------------------


def decode_video(
    data: bytes, limits: MediaLimits, num_frames: int, *, field: str = "video"
) -> np.ndarray:
    """Decode `num_frames` frames sampled uniformly over the whole video (the one decoder,
    petserve.adapters.data.video.read_video, as in training).

    Returns a (num_frames, H, W, 3) uint8 RGB array at the video's own size.
    Errors: bad num_frames, empty input or zero frames -> 400; too many bytes,
    too long or too many pixels per frame -> 413; not a decodable video -> 415.
    """
    if not 1 <= num_frames <= limits.max_video_frames_sampled:
        raise ApiError.bad_request(
            "invalid_num_frames",
            f"{field}: num_frames must be between 1 and {limits.max_video_frames_sampled}",
        )
    if not data:
        raise ApiError.bad_request("invalid_video", f"{field}: is empty")
    if len(data) > limits.max_video_bytes:
        raise _too_large(field, limits.max_video_bytes)

    def check(info: VideoInfo) -> None:
        if info.fps > 0 and info.frames / info.fps > limits.max_video_seconds:
            raise ApiError.payload_too_large(
                f"{field}: video is {info.frames / info.fps:.0f} s long; the limit is "
                f"{limits.max_video_seconds:.0f} s", code="video_too_long")

    # decord can read from memory, but then logs the input bytes (up to the
    # first NUL) to stderr when they are not a video; a temp file keeps junk
    # uploads out of the logs.
    with tempfile.NamedTemporaryFile(prefix="petserve-", suffix=".video") as f:
        f.write(data)
        f.flush()
        try:
            return read_video(f.name, num_frames, limits.max_video_frame_pixels, check)
        except VideoError as e:
            if e.code == "empty_video":
                raise ApiError.bad_request("empty_video", f"{field}: {e}") from None
            if e.code == "video_too_large":
                raise ApiError.payload_too_large(f"{field}: {e}", code="video_too_large") from None
            raise _unsupported_video(field, str(e)) from None


def _unsupported_video(field: str, detail: str) -> ApiError:
    return ApiError.unsupported_media(
        "unsupported_video", f"{field}: not a decodable video ({detail})"
    )
