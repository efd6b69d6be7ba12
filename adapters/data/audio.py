"""Audio in: decoding (soundfile: wav, flac, ogg), resampling (soxr) and AST's filterbank
(transformers' ASTFeatureExtractor), with every refusal a clear :class:`AudioError`; and the
demo tasks' clips (docs/METHODS.md, "Audio"), synthesised with numpy.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

MIN_SAMPLE_RATE = 4000          # below this no AST filterbank (up to 8 kHz) means anything
MAX_CHANNELS = 8                # mixed down to mono; more is refused (not a recording we expect)


class AudioError(ValueError):
    """Audio that cannot be classified. ``code`` is machine-readable; ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def decode_audio(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of an encoded file. Refuses what is not audio, empty,
    longer than ``max_seconds`` (413), at an absurd rate, with too many channels, or with
    non-finite samples."""
    import soundfile as sf
    if not data:
        raise AudioError("empty_audio", "the audio file is empty", 400)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels, frames = f.samplerate, f.channels, f.frames
            if sr < MIN_SAMPLE_RATE:
                raise AudioError("bad_sample_rate", f"sample rate {sr} Hz is below "
                                 f"{MIN_SAMPLE_RATE} Hz; send audio recorded at 8-48 kHz")
            if channels > MAX_CHANNELS:
                raise AudioError("too_many_channels", f"{channels} channels; at most "
                                 f"{MAX_CHANNELS} are mixed down to mono")
            if frames > max_seconds * sr:
                raise AudioError("audio_too_long", f"{frames / sr:.1f} s of audio; this server "
                                 f"takes at most {max_seconds:g} s", 413)
            samples = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        why = str(e).rsplit(": ", 1)[-1]           # libsndfile's reason, without the stream repr
        raise AudioError("not_audio", f"not a readable audio file (wav, flac, ogg): {why}") from None
    if samples.shape[0] == 0:
        raise AudioError("empty_audio", "the audio file holds no samples", 400)
    if not np.isfinite(samples).all():
        raise AudioError("non_finite_audio", "the audio holds NaN or infinite samples")
    return samples.mean(axis=1), sr


def resample(samples: np.ndarray, sr: int, target: int) -> np.ndarray:
    """``samples`` at ``target`` Hz (soxr, high quality); unchanged when already there."""
    if sr == target:
        return samples
    import soxr
    return soxr.resample(samples, sr, target, quality="HQ").astype(np.float32)


class Featurizer:
    """Clips -> (B, frames, mel) normalised filterbanks exactly as the backbone was trained on."""

    def __init__(self, cfg):
        from transformers import ASTFeatureExtractor
        self.cfg = cfg
        self.extractor = ASTFeatureExtractor(**cfg.extractor_config())

    def __call__(self, clips: list[np.ndarray]) -> torch.Tensor:
        out = self.extractor(list(clips), sampling_rate=self.cfg.sampling_rate, return_tensors="pt")
        return out["input_values"]

    def from_bytes(self, data: bytes, max_seconds: float) -> torch.Tensor:
        """One encoded file -> (frames, mel)."""
        samples, sr = decode_audio(data, max_seconds)
        return self([resample(samples, sr, self.cfg.sampling_rate)])[0]


def wav_bytes(samples: np.ndarray, sr: int = 16000, subtype: str = "PCM_16",
              fmt: str = "WAV") -> bytes:
    """Encode samples (frames,) or (frames, channels) with soundfile (tests, README examples)."""
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, samples, sr, subtype=subtype, format=fmt)
    return buf.getvalue()


# ---- the demo tasks ------------------------------------------------------------------------
SR = 16000
NOTES = {"C4": 261.63, "D4": 293.66, "E4": 329.63, "F4": 349.23, "G4": 392.00, "A4": 440.00,
         "B4": 493.88, "C5": 523.25}
BEEPS = ("one", "two", "three", "four", "five")
TIMBRES = ("sine", "square", "sawtooth", "noise")
AUDIO_TASKS = {"pitch": tuple(NOTES), "beeps": BEEPS, "timbre": TIMBRES}


@dataclass
class Clips:
    clips: list[np.ndarray]
    labels: list[int]           # index into the task's label tuple


def _wave(kind: str, freq: float, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / SR
    phase = 2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)
    if kind == "sine":
        return np.sin(phase)
    if kind == "square":
        return np.sign(np.sin(phase))
    if kind == "sawtooth":
        return 2 * ((phase / (2 * np.pi)) % 1.0) - 1
    return rng.uniform(-1, 1, n)


def _finish(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random loudness and a little background noise; 1 s, float32."""
    x = x * rng.uniform(0.2, 0.8) + rng.normal(0, rng.uniform(0.001, 0.01), x.shape[0])
    return x.astype(np.float32)


def make_clip(task: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """One 1 s clip of ``task`` with answer ``AUDIO_TASKS[task][label]``."""
    n = SR
    if task == "pitch":                  # a sine at the note, random onset and length
        freq = list(NOTES.values())[label] * rng.uniform(0.995, 1.005)
        x = np.zeros(n)
        start, length = int(rng.uniform(0, 0.3) * SR), int(rng.uniform(0.4, 0.7) * SR)
        x[start:start + length] = _wave("sine", freq, length, rng) * np.hanning(length)
        return _finish(x, rng)
    if task == "beeps":                  # k short tone bursts at one random pitch
        k, freq = label + 1, rng.uniform(500, 2500)
        x, slot = np.zeros(n), n // 5
        for j in range(k):
            length = int(rng.uniform(0.06, 0.1) * SR)
            start = j * slot + int(rng.uniform(0, slot - length))
            x[start:start + length] = _wave("sine", freq, length, rng) * np.hanning(length)
        return _finish(x, rng)
    if task == "timbre":                 # one waveform over the whole clip, random pitch
        freq = rng.uniform(150, 900)
        return _finish(_wave(TIMBRES[label], freq, n, rng) * 0.7, rng)
    raise ValueError(f"unknown audio task {task!r}; tasks: {', '.join(AUDIO_TASKS)}")


def make_clips(task: str, per_class: int, seed: int) -> Clips:
    """``per_class`` clips of every label of ``task``, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = [c for c in range(len(AUDIO_TASKS[task])) for _ in range(per_class)]
    return Clips([make_clip(task, c, rng) for c in labels], labels)


# the backbone's pre-training objective: none of the demo tasks (no notes, counts or waveform
# classes), two factors of a frequency sweep: its direction and its loudness envelope
SWEEPS = ("up", "down", "flat")
ENVELOPES = ("rising", "falling", "steady")


def make_pretraining_clip(rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """(clip, sweep label, envelope label): a sine chirp over a random band."""
    sweep, env = int(rng.integers(3)), int(rng.integers(3))
    f0 = rng.uniform(200, 3000)
    f1 = f0 * (rng.uniform(1.5, 3.0), 1 / rng.uniform(1.5, 3.0), 1.0)[sweep]
    t = np.arange(SR) / SR
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / 2)
    shape = (t, 1 - t, np.ones_like(t))[env]
    return _finish(np.sin(phase) * (0.1 + 0.9 * shape), rng), sweep, env
