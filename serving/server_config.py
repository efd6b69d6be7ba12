"""ServerConfig: everything `petserve serve`, `serve run` and the tests configure, validated once.

Loadable from CLI arguments (`ServerConfig(**overrides)`), from a YAML file (`from_yaml`) and from
the `args:` block of a Ray Serve config (`model_validate`). Unknown keys are an error, so a typo in
a YAML file is reported instead of silently ignored.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from petserve.serving.media import MediaLimits

DEFAULT_STORE = Path("~/.cache/petserve/store")
DEFAULT_TOKEN_ENV = "PETSERVE_TOKEN"
# s3://bucket[/prefix]: an S3 bucket name, then key segments (no empty, '.' or '..' ones).
S3_URL_RE = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])"
                       r"(?:/(?P<prefix>(?:(?!\.\.?/)[A-Za-z0-9._-]+/)*(?!\.\.?$)[A-Za-z0-9._-]+)?/?)?")


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket[/prefix]`` (prefix without slashes at either end, maybe
    ""); ValueError naming the expected form otherwise."""
    m = S3_URL_RE.fullmatch(url)
    if m is None:
        raise ValueError(f"{url!r} is not s3://BUCKET[/PREFIX] (a bucket name of 3 to 63 lowercase "
                         "letters, digits, '.' or '-'; prefix segments of letters, digits, '.', "
                         "'_' or '-')")
    return m["bucket"], m["prefix"] or ""


def store_env() -> str:
    """`PETSERVE_STORE`: the store a server opens unless told otherwise, a directory or an s3:// URL
    ("" when unset)."""
    return os.environ.get("PETSERVE_STORE", "")


def default_store_dir() -> Path:
    """`PETSERVE_STORE` when it is a directory, else ~/.cache/petserve/store (with an s3:// store,
    the replica's blob cache lives under it)."""
    env = store_env()
    return Path(env if env and not env.startswith("s3://") else DEFAULT_STORE).expanduser()


def default_store_url() -> str | None:
    """`PETSERVE_STORE` when it is an s3:// URL, else None."""
    env = store_env()
    return env if env.startswith("s3://") else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Hard caps of what one request may ask, whatever a replica is configured to allow.
MAX_NEW_TOKENS = 64
MAX_BEAMS = 5
MAX_MEMBERS = 16         # adapters one request may compose


class EngineConfig(_Strict):
    """One backbone replica's engine (serving/engine.py): slots, batching, queue and limits.
    Admission (serving/schemas.py) checks requests against the same object the engine runs with."""

    num_slots: int = Field(16, ge=1, le=4096, description="adapter slots on the device")
    cpu_cache_mib: float = Field(1024, gt=0, description="MiB of CPU memory for parsed and "
                                 "compiled stored adapters (LRU; slot loads from it skip the store)")
    cpu_cache_adapters: int = Field(64, ge=0, description="composed and generated adapters kept "
                                    "in CPU memory")
    max_batch_rows: int = Field(32, ge=1, description="decoder rows per step (a beam is a row)")
    max_prefill_tokens: int = Field(4096, ge=1, description="encoder tokens admitted per step")
    max_queue: int = Field(256, ge=1, description="waiting requests; beyond it 503 overloaded")
    max_context_items: int = Field(64, ge=1, description="items in one context a generator turns "
                                   "into an adapter (more: 413)")
    feature_cache_items: int = Field(1024, ge=0, description="vision features cached by content")
    max_new_tokens_cap: int = Field(MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS)
    max_beams: int = Field(MAX_BEAMS, ge=1, le=MAX_BEAMS)
    unhealthy_after_failures: int = Field(5, ge=1, description="failed phases in a row: unhealthy")
    stall_timeout_s: float = Field(300.0, gt=0, description="one scheduler iteration this long: hung")

    @model_validator(mode="after")
    def _beams_fit_a_batch(self) -> EngineConfig:
        if self.max_beams > self.max_batch_rows:
            raise ValueError("max_beams must not exceed max_batch_rows (a beam is a batch row)")
        return self


class MediaSettings(_Strict):
    """Per-request media limits (serving.media.MediaLimits) and how many frames a video gives."""

    max_image_bytes: int = Field(10 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_image_side: int = Field(8192, ge=1)
    max_video_bytes: int = Field(64 * 2**20, ge=1)
    max_video_seconds: float = Field(600.0, gt=0)
    max_video_frame_pixels: int = Field(3840 * 2160, ge=1)
    video_frames: int = Field(8, ge=1, le=32)

    def limits(self) -> MediaLimits:
        fields = self.model_dump(exclude={"video_frames"})
        return MediaLimits(max_video_frames_sampled=self.video_frames, **fields)


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of the backbone deployment (replaces a fixed `replicas`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServerConfig(_Strict):
    """One petserve server. `backbone=None` means the embedded default (tiny + demo adapters)."""

    backbone: str | None = Field(None, description="preset name or backbone directory")
    store_dir: Path = Field(default_factory=default_store_dir, description="the adapter store "
                            "directory; with store_url, this replica's cache of S3 blobs under it")
    store_url: str | None = Field(default_factory=default_store_url, validate_default=True,
                                  description="s3://bucket[/prefix]: keep the adapter store in "
                                  "S3 (endpoint and credentials from the AWS environment; "
                                  "default: $PETSERVE_STORE when it is such a URL)")
    store_cache_mib: int = Field(2048, ge=1, description="with store_url: the budget of the S3 blob "
                                 "cache in store_dir (least recently used blobs dropped first)")
    generator: Path | None = Field(None, description="Generative Adapter generator for the backbone "
                                   "(petserve train-generator); the embedded default ships one")
    clip: Path | None = Field(None, description="CLIP's text side for /v1/classify: a text tower "
                              "file, or a CLIPModel save_pretrained directory; the embedded "
                              "default ships one")
    audio_backbone: str | None = Field(None, description="the audio family's AST (an audio preset "
                                       "or a Hugging Face AST directory) for /v1/audio/classify; "
                                       "the embedded default ships one")
    max_audio_seconds: float = Field(30.0, gt=0, le=3600, description="longest audio clip accepted "
                                     "(longer: 413)")
    adapters_dir: Path | None = Field(None, description="put every *.safetensors here into the store "
                                      "at start (id: the file name without .safetensors)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = Field(None, description="write token; None: read token_env, else generate")
    token_env: str = DEFAULT_TOKEN_ENV
    auth_reads: bool = Field(False, description="also require the token for inference and reads")
    replicas: int = Field(1, ge=1, description="backbone replicas (one per GPU when GPUs exist)")
    ingress: Literal["auto", "backbone", "separate"] = Field("auto", description=(
        "Ray Serve: 'backbone' runs the HTTP app inside each backbone replica (one hop: Serve's "
        "proxy -> replica); 'separate' in its own Ingress deployment, which routes each request "
        "by its body's adapter id to a replica holding it; 'auto': backbone for one backbone "
        "replica, separate for more (or autoscaling)"))
    ingress_replicas: int = Field(1, ge=1, description="Ingress replicas (ingress 'separate')")
    backbone_cpus: float = Field(1.0, ge=0, description="CPUs reserved per backbone replica")
    ingress_cpus: float = Field(0.5, ge=0, description="CPUs reserved per ingress replica "
                                "(ingress 'separate')")
    audio_cpus: float = Field(0.5, ge=0, description="CPUs reserved per audio backbone replica")
    autoscaling: AutoscalingSettings | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    media: MediaSettings = Field(default_factory=MediaSettings)
    max_body_bytes: int = Field(128 * 2**20, ge=1024, description="largest inference request")
    max_adapter_bytes: int = Field(256 * 2**20, ge=1024, description="largest adapter upload")
    metrics_push_interval_s: float = Field(1.0, gt=0)
    metrics_max_adapters: int = Field(100, ge=1, description="adapters /metrics labels by id "
                                      "(the most active); the rest count as adapter=_other")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Ray Serve replica logs (INFO adds one access line per request)")

    @field_validator("store_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return Path(value).expanduser()

    @field_validator("store_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None:
            split_s3_url(value)
        return value

    @classmethod
    def from_yaml(cls, path: Path | str) -> ServerConfig:
        import yaml
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def many_replicas(self) -> bool:
        """Whether the backbone deployment may run more than one replica."""
        return self.replicas > 1 or self.autoscaling is not None

    def ingress_in_backbone(self) -> bool:
        """Whether the Ray Serve app runs the HTTP app inside the backbone replicas (one hop)."""
        if self.ingress != "auto":
            return self.ingress == "backbone"
        return not self.many_replicas()
