"""Media loading and preprocessing for Gemma 4: images, video and audio, as transformers' processor does it.

Every number here reproduces the reference processor (transformers 5.23 `Gemma4Processor` with
`Gemma4ImageProcessorPil`, `Gemma4VideoProcessor`, `Gemma4AudioFeatureExtractor`); FORMAT.md §5 has the rules:

* image: RGB, resized (PIL bicubic) keeping the aspect ratio so that both sides are multiples of 48 px and
  at most `budget x 9` patches of 16 px result; pixels x 1/255 (no mean/std: the model maps to [-1, 1]);
  16x16 patches flattened (row, column, channel); N = patches / 9 soft tokens, budget 70/140/280/560/1120.
* video: 32 frames picked uniformly (`arange(32) * total // 32`), each an image at budget 70 (resized as
  torchvision does: bicubic with antialias on uint8), stamped `mm:ss` from its index / fps.
* audio: mono 16 kHz, log-mel (20 ms periodic-Hann window, 10 ms hop, 512-point FFT, 128 HTK bins 0-8 kHz,
  log(mel + 0.001)), semicausal left pad of 160 samples; N = ceil(frames / 4) soft tokens, 25 per second.

Anything we cannot use — unreadable, truncated, empty, too large, too long, wrongly sampled — raises
`MediaError` (a ValueError) with the reason; nothing is silently truncated or guessed.

Heavy decoders (PyAV, soundfile) are imported when first needed.
"""
from __future__ import annotations

import base64
import io
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

PATCH_SIZE = 16
POOLING = 3  # 3x3 patches -> one soft token
IMAGE_BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens per image the model supports
DEFAULT_IMAGE_BUDGET = 280  # transformers' default (JAX's sampler uses 1120)
MAX_IMAGE_PIXELS = 100_000_000  # decompression-bomb guard, checked before decoding
VIDEO_FRAMES = 32
VIDEO_FRAME_BUDGET = 70
VIDEO_DEFAULT_FPS = 24.0  # what the reference assumes when a file does not say
MAX_VIDEO_SECONDS = 60.0
SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 30.0
MAX_AUDIO_RATE = 384_000  # Hz, checked before decoding: a few KB of FLAC can claim any rate
MAX_AUDIO_SAMPLES = 1 << 25  # decoded samples over all channels (128 MB of float32): 31 s x 384 kHz stereo fits
MAX_RESAMPLE_FILTER = 1 << 24  # filter taps: 44,100 Hz needs 76,000; a coprime rate like 44,101 Hz 706 million
MAX_AUDIO_TOKENS = 750  # 30 s
# Log-mel front end (Gemma4AudioFeatureExtractor defaults).
MEL_BINS, FRAME_LENGTH, HOP_LENGTH, FFT_LENGTH, MEL_FLOOR = 128, 320, 160, 512, 1e-3
PAD_TO_MULTIPLE = 128  # the extractor pads the waveform to a multiple of 128 samples

BOI, EOI, IMAGE_TOKEN = "<|image>", "<image|>", "<|image|>"
BOA, EOA, AUDIO_TOKEN = "<|audio>", "<audio|>", "<|audio|>"
VIDEO_TOKEN = "<|video|>"


class MediaError(ValueError):
    """An image, video or audio input that cannot be used, with the reason."""


# ---- processed media -----------------------------------------------------------------------------------------
@dataclass
class ImageInput:
    """One preprocessed image: its real patches (no padding) and their (x, y) patch positions."""
    pixel_values: np.ndarray  # [P, 768] float32 in [0, 1]
    positions: np.ndarray  # [P, 2] int64 (x = column, y = row)
    num_tokens: int  # P / 9
    size: tuple[int, int]  # (height, width) after resizing
    budget: int
    kind: str = "image"


@dataclass
class VideoInput:
    """Sampled, preprocessed frames of one video; every frame is encoded like an image."""
    pixel_values: np.ndarray  # [F, P, 768] float32
    positions: np.ndarray  # [F, P, 2] int64
    tokens_per_frame: int
    timestamps: list[float]  # seconds, frame index / fps
    fps: float
    size: tuple[int, int]
    budget: int
    kind: str = "video"

    @property
    def num_tokens(self) -> int:
        return self.pixel_values.shape[0] * self.tokens_per_frame


@dataclass
class AudioInput:
    """Log-mel features of one clip (16 kHz mono), padded as the reference pads a single clip."""
    features: np.ndarray  # [T, 128] float32, zero on padding frames
    mask: np.ndarray  # [T] bool, True = a frame entirely inside the real audio
    num_tokens: int
    num_samples: int
    kind: str = "audio"
    waveform: np.ndarray | None = field(default=None, repr=False)


# ---- sources -------------------------------------------------------------------------------------------------
def _read_source(src, what: str) -> bytes | str:
    """bytes, a data URL, a base64 string or a file path -> bytes or an existing path."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError(f"{what}: empty data")
        return data
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if not isinstance(src, str):
        raise MediaError(f"{what}: expected bytes, a file path or a data URL, got {type(src).__name__}")
    if src.startswith("data:"):
        head, _, payload = src.partition(",")
        if ";base64" not in head:
            raise MediaError(f"{what}: only base64 data URLs are supported")
        try:
            data = base64.b64decode(payload, validate=False)
        except ValueError as e:
            raise MediaError(f"{what}: bad base64 in data URL ({e})") from None
        if not data:
            raise MediaError(f"{what}: empty data URL")
        return data
    if src.startswith(("http://", "https://")):
        raise MediaError(f"{what}: URLs are not fetched here; download it and pass the bytes or a path")
    if os.path.isfile(src):
        return src
    raise MediaError(f"{what}: no such file {src!r}")


# ---- images --------------------------------------------------------------------------------------------------
def image_target_size(height: int, width: int, budget: int = DEFAULT_IMAGE_BUDGET) -> tuple[int, int]:
    """(H', W'): the largest size with the same aspect ratio, both sides multiples of 48, that gives at most
    `budget x 9` patches (transformers' `get_aspect_ratio_preserving_size`; JAX's `get_target_dimensions`)."""
    if budget not in IMAGE_BUDGETS:
        raise MediaError(f"image budget {budget} is not one of {IMAGE_BUDGETS} soft tokens")
    if height <= 0 or width <= 0:
        raise MediaError(f"image has zero size ({width}x{height})")
    max_patches = budget * POOLING ** 2
    target_px = max_patches * PATCH_SIZE ** 2
    factor = math.sqrt(target_px / (height * width))
    side = POOLING * PATCH_SIZE
    h, w = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    longest = (max_patches // POOLING ** 2) * side
    if h == 0 and w == 0:
        raise MediaError(f"image {width}x{height} cannot be resized to a non-empty size")
    if h == 0:  # very wide: one row of soft tokens
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:  # very tall: one column
        w, h = side, min(int(math.floor(height / width)) * side, longest)
    if h * w > target_px:
        raise MediaError(f"image {width}x{height}: resized {w}x{h} exceeds {max_patches} patches")
    return h, w


def num_image_tokens(height: int, width: int, budget: int = DEFAULT_IMAGE_BUDGET) -> int:
    h, w = image_target_size(height, width, budget)
    return (h // PATCH_SIZE) * (w // PATCH_SIZE) // POOLING ** 2


def _check_image_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"image has zero size ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(f"image is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (possible decompression bomb)")


def load_image(src):
    """Bytes / path / data URL -> an RGB PIL image, as the reference's `load_image` makes it (EXIF orientation
    applied, then `convert("RGB")`). A PIL image or a uint8 array is checked and returned as is (its alpha,
    if any, is composited onto white by `preprocess_image`, as the reference's image processor does)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(src, Image.Image):
        _check_image_size(*src.size)
        return src
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise MediaError(f"image array must be uint8 [H, W] or [H, W, 1|3|4], got {src.dtype} {src.shape}")
        _check_image_size(src.shape[1], src.shape[0])
        return Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src)
    data = _read_source(src, "image")
    try:
        with warnings.catch_warnings():
            # We apply our own (stricter) pixel limit before decoding; PIL's own warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            _check_image_size(*im.size)
            im.load()  # decode now: a truncated or corrupt file fails here, not later
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError("image: not a recognised image format (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:  # PIL's own limit can fire first, while reading the header
        raise MediaError(f"image is over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (possible decompression "
                         f"bomb): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"image: cannot decode ({e}); the file is truncated or corrupt") from None


def _to_rgb(im):
    """RGB, compositing any transparency onto white (the reference image processor's `convert_to_rgb`)."""
    from PIL import Image

    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def patchify(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] -> patches [P, 16*16*3] (each flattened row, column, channel; patches row-major) and
    positions [P, 2] = (x, y) in patches."""
    H, W, C = pixels.shape
    ph, pw = H // PATCH_SIZE, W // PATCH_SIZE
    patches = pixels.reshape(ph, PATCH_SIZE, pw, PATCH_SIZE, C).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    ys, xs = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
    positions = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(np.int64)
    return np.ascontiguousarray(patches), positions


def preprocess_image(src, budget: int = DEFAULT_IMAGE_BUDGET) -> ImageInput:
    """Any `load_image` source -> ImageInput (the reference image processor's pixel values, unpadded)."""
    from PIL import Image

    im = _to_rgb(load_image(src))
    w, h = im.size
    th, tw = image_target_size(h, w, budget)
    if (th, tw) != (h, w):
        im = im.resize((tw, th), resample=Image.BICUBIC)
    # x 1/255 in float64, then float32: bit for bit the reference's `rescale`.
    pixels = (np.asarray(im, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    patches, positions = patchify(pixels)
    return ImageInput(patches, positions, patches.shape[0] // POOLING ** 2, (th, tw), budget)


def pad_patches(items, max_patches: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack images (or video frames) as the reference batches them: [N, max_patches, 768] pixel values
    padded with 0, positions [N, max_patches, 2] padded with -1 (default: budget x 9 of the largest budget)."""
    frames = []
    for it in items:
        if it.kind == "video":
            frames += [(p, q) for p, q in zip(it.pixel_values, it.positions)]
        else:
            frames.append((it.pixel_values, it.positions))
    if max_patches is None:
        max_patches = max(it.budget for it in items) * POOLING ** 2
    pv = np.zeros((len(frames), max_patches, frames[0][0].shape[-1]), np.float32)
    pos = np.full((len(frames), max_patches, 2), -1, np.int64)
    for i, (p, q) in enumerate(frames):
        pv[i, :len(p)], pos[i, :len(q)] = p, q
    return pv, pos


# ---- video ---------------------------------------------------------------------------------------------------
def _open_container(src, what: str):
    import av

    data = _read_source(src, what)
    try:
        return av.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{what}: cannot open ({e}); not a media file, or corrupt") from None


def sample_frame_indices(total_frames: int, num_frames: int = VIDEO_FRAMES) -> np.ndarray:
    """`arange(n) * total // n` (transformers' default sampler), n = min(num_frames, total): the reference
    raises for a clip shorter than 32 frames; we take every frame instead."""
    n = min(num_frames, total_frames)
    return np.arange(n, dtype=np.int64) * total_frames // n


def resize_frames(frames, height: int, width: int):
    """uint8 [F, 3, H, W] tensor -> [F, 3, height, width]: bicubic with antialias on uint8, which is what
    torchvision's `resize` (the reference video processor) runs on a CPU."""
    import torch.nn.functional as F

    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames, size=[height, width], mode="bicubic", align_corners=False, antialias=True)


def load_video(src, budget: int = VIDEO_FRAME_BUDGET, num_frames: int = VIDEO_FRAMES) -> VideoInput:
    """A video file (bytes / path / data URL) -> VideoInput: up to 32 uniformly sampled frames, each at
    `budget` soft tokens, with their timestamps. Videos over 60 s are refused, and frames over the image pixel
    limit before any is decoded; each frame is resized as it is decoded (32 full 4K frames would be 800 MB)."""
    import av
    import torch

    container = _open_container(src, "video")
    with container:
        if not container.streams.video:
            raise MediaError("video: the file has no video stream")
        stream = container.streams.video[0]
        _check_image_size(stream.codec_context.width, stream.codec_context.height)
        fps = float(stream.average_rate) if stream.average_rate else None
        total = stream.frames
        try:
            if total <= 0:  # not in the header (e.g. Matroska / WebM): count packets, without decoding
                total = sum(1 for p in container.demux(stream) if p.size)
                container.seek(0)
                declared = container.duration / 1e6 if container.duration else None  # seconds
                if declared and fps and total < 0.9 * declared * fps - 1:
                    raise MediaError(f"video: the header says {declared:.1f} s but only {total} frames "
                                     f"({total / fps:.1f} s) are there (truncated file)")
            if total <= 0:
                raise MediaError("video: no frames")
            seconds = total / (fps or VIDEO_DEFAULT_FPS)
            if seconds > MAX_VIDEO_SECONDS:
                raise MediaError(f"video is {seconds:.1f} s long; at most {MAX_VIDEO_SECONDS:.0f} s is supported")
            indices = sample_frame_indices(total, num_frames)
            wanted, frames, size = set(indices.tolist()), [], None
            for i, frame in enumerate(container.decode(stream)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    if size is None:
                        size = (frame.height, frame.width)
                        _check_image_size(frame.width, frame.height)
                        th, tw = image_target_size(*size, budget)
                    elif (frame.height, frame.width) != size:
                        raise MediaError(f"video: frame size changes from {size[1]}x{size[0]} to "
                                         f"{frame.width}x{frame.height}")
                    # The reference resizes the stacked frames (torchvision: bicubic with antialias on uint8);
                    # frame by frame is the same arithmetic.
                    pixels = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]
                    frames.append(resize_frames(pixels, th, tw)[0])  # [3, th, tw] uint8
        except av.error.FFmpegError as e:
            raise MediaError(f"video: decoding failed ({e}); the file is truncated or corrupt") from None
    if len(frames) < len(indices):
        raise MediaError(f"video: the header promises {total} frames but only {len(frames)} of the "
                         f"{len(indices)} sampled could be decoded (truncated or corrupt file)")
    t = torch.stack(frames)  # [F, 3, th, tw] uint8
    # The reference's fused rescale + identity normalisation: (x - 0) / 255 in float32.
    pixels = (t.permute(0, 2, 3, 1).to(torch.float32) / 255.0).numpy()
    patched = [patchify(f) for f in pixels]
    pv = np.stack([p for p, _ in patched])
    pos = np.stack([q for _, q in patched])
    fps = fps or VIDEO_DEFAULT_FPS
    return VideoInput(pv, pos, pv.shape[1] // POOLING ** 2, [i / fps for i in indices.tolist()], fps, (th, tw),
                      budget)


def video_timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


# ---- audio ---------------------------------------------------------------------------------------------------
def resample(wave: np.ndarray, orig: int, new: int = SAMPLE_RATE) -> np.ndarray:
    """Windowed-sinc resampling, the algorithm of torchaudio's `functional.resample` with its defaults (Hann
    window, 6 zero crossings, roll-off 0.99) — the reference's `torchaudio` decoding backend."""
    import torch
    import torch.nn.functional as F

    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width_zc, rolloff = 6, 0.99
    base = min(o, n) * rolloff
    width = math.ceil(width_zc * o / base)
    if n * (2 * width + o) > MAX_RESAMPLE_FILTER:  # the filter is built whole: [n, 1, 2 * width + o] floats
        raise MediaError(f"audio sampled at {orig} Hz cannot be resampled to {new} Hz here (the exact filter for "
                         f"that ratio has {n * (2 * width + o):,} taps); convert it to a common rate such as "
                         f"16000, 44100 or 48000 Hz")
    idx = torch.arange(-width, width + o, dtype=torch.float32)[None, None] / o
    t = torch.arange(0, -n, -1, dtype=torch.float32)[:, None, None] / n + idx  # [n, 1, K]
    t = (t * base).clamp(-width_zc, width_zc)
    window = torch.cos(t * math.pi / width_zc / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0), t.sin() / t) * window * (base / o)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None, None]
    x = F.pad(x, (width, width + o))
    y = F.conv1d(x, kernel, stride=o).transpose(1, 2).reshape(-1)  # interleave the n phases
    return y[:math.ceil(n * wave.shape[-1] / o)].numpy()


def _wav_truncated(head: bytes, total: int) -> bool:
    """A RIFF/WAVE file whose data chunk claims more bytes than the file holds (libsndfile silently reads
    what is there)."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    pos = 12
    while pos + 8 <= len(head):
        cid, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if cid == b"data":
            return size != 0xFFFFFFFF and size > total - (pos + 8)  # 0xFFFFFFFF: written as a stream
        pos += 8 + size + (size & 1)
    return False


def _decode_audio(data) -> tuple[np.ndarray, int]:
    """bytes or path -> (float32 [channels, samples], rate): soundfile first, PyAV for what it cannot read."""
    import soundfile as sf

    if isinstance(data, bytes):
        head, total = data[:65536], len(data)
    else:
        with open(data, "rb") as fh:
            head, total = fh.read(65536), os.path.getsize(data)
    if _wav_truncated(head, total):
        raise MediaError("audio: the WAV file is truncated (its data chunk is longer than the file)")
    try:
        with sf.SoundFile(io.BytesIO(data) if isinstance(data, bytes) else data) as f:
            _check_audio_header(f.samplerate, f.channels, f.frames)  # before reading it all
            samples = f.read(dtype="float32", always_2d=True)
            if samples.shape[0] < f.frames:
                raise MediaError(f"audio: only {samples.shape[0]} of {f.frames} samples could be read "
                                 f"(truncated or corrupt file)")
            return samples.T, f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError):
        pass
    import av

    container = _open_container(data, "audio")
    with container:
        if not container.streams.audio:
            raise MediaError("audio: the file has no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # planar float32, channels and rate unchanged
        chunks, rate, frames = [], stream.rate, 0
        _check_audio_header(rate, stream.codec_context.channels, 0)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    frames += out.samples
                    # as it decodes: such a stream need not say its duration up front
                    _check_audio_header(rate, stream.codec_context.channels, frames)
        except av.error.FFmpegError as e:
            raise MediaError(f"audio: decoding failed ({e}); the file is truncated or corrupt") from None
    if not chunks:
        raise MediaError("audio: no samples could be decoded")
    return np.concatenate(chunks, axis=1).astype(np.float32), rate


def _check_audio_header(rate: int, channels: int, frames: int) -> None:
    """Refuse audio whose rate, channels or length (frames per channel) we will not decode."""
    if not 0 < rate <= MAX_AUDIO_RATE:
        raise MediaError(f"audio sample rate {rate} Hz is not supported (at most {MAX_AUDIO_RATE} Hz)")
    if frames > (MAX_AUDIO_SECONDS + 1) * rate:
        raise MediaError(f"audio is {frames / rate:.1f} s long or more; at most {MAX_AUDIO_SECONDS:.0f} s per clip "
                         f"is supported")
    if channels <= 0 or channels * max(frames, 1) > MAX_AUDIO_SAMPLES:
        raise MediaError(f"audio with {channels} channels x {frames} samples is too large to decode")


def load_audio(src, sampling_rate: int | None = None) -> np.ndarray:
    """-> mono float32 samples at 16 kHz.

    A file (bytes / path / data URL; WAV, FLAC, OGG via soundfile, MP3, M4A, ... via PyAV) is averaged to mono
    and resampled to 16 kHz, as the reference's `load_audio` does. An array is taken as samples at
    `sampling_rate` (default 16 kHz); any other rate is an error, since the reference feature extractor would
    silently treat it as 16 kHz. Longer than 30 s, empty or non-finite audio is an error too."""
    if isinstance(src, (np.ndarray, list, tuple)):
        wave = np.asarray(src, dtype=np.float32)
        if sampling_rate is not None and sampling_rate != SAMPLE_RATE:
            raise MediaError(f"audio array sampled at {sampling_rate} Hz; the model takes {SAMPLE_RATE} Hz "
                             f"(resample it, or pass the encoded file to have it resampled)")
        if wave.ndim == 2:  # (samples, channels) as soundfile gives it, or (channels, samples)
            wave = wave.mean(axis=1) if wave.shape[1] <= 8 else wave.mean(axis=0)
        elif wave.ndim != 1:
            raise MediaError(f"audio array must be [samples] or [samples, channels], got shape {wave.shape}")
    else:
        if sampling_rate is not None:
            raise MediaError("sampling_rate is for raw arrays; a file states its own rate")
        channels, rate = _decode_audio(_read_source(src, "audio"))  # rate and length checked while decoding
        wave = channels.mean(axis=0) if channels.shape[0] > 1 else channels[0]
        if rate != SAMPLE_RATE:
            wave = resample(wave, rate, SAMPLE_RATE)
    return check_audio(np.ascontiguousarray(wave, dtype=np.float32))


def check_audio(wave: np.ndarray) -> np.ndarray:
    if wave.size == 0:
        raise MediaError("audio is empty")
    if not np.isfinite(wave).all():
        raise MediaError("audio contains NaN or infinite samples")
    seconds = wave.shape[0] / SAMPLE_RATE
    if seconds > MAX_AUDIO_SECONDS:
        raise MediaError(f"audio is {seconds:.1f} s long; at most {MAX_AUDIO_SECONDS:.0f} s per clip is "
                         f"supported (split it into several clips)")
    if num_audio_tokens(wave.shape[0]) == 0:
        raise MediaError(f"audio is too short ({wave.shape[0]} samples): it gives no soft token")
    return wave


def num_audio_tokens(num_samples: int) -> int:
    """Soft tokens for S samples at 16 kHz (transformers' `_compute_audio_num_tokens`): mel frames
    floor((S + 160 - 321) / 160) + 1, halved (rounding up) by each of the two stride-2 convolutions."""
    frames = (num_samples + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1
    if frames <= 0:
        return 0
    for _ in range(2):
        frames = (frames - 1) // 2 + 1
    return min(frames, MAX_AUDIO_TOKENS)


def _hertz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hertz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filters(num_bins: int = FFT_LENGTH // 2 + 1, num_mel: int = MEL_BINS, fmin: float = 0.0,
                fmax: float = 8000.0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[num_bins, num_mel] triangular HTK-mel filters without area normalisation (float64)."""
    mel = np.linspace(_hertz_to_mel(fmin), _hertz_to_mel(fmax), num_mel + 2)
    edges = _mel_to_hertz(mel)  # filter corner frequencies
    fft_freqs = np.linspace(0, rate // 2, num_bins)
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # [bins, num_mel + 2]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


_MEL = None


def log_mel(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mono 16 kHz float32 samples -> (features [T, 128] float32, mask [T] bool): the reference feature
    extractor on one clip, padded to a multiple of 128 samples as it pads one clip."""
    global _MEL
    if _MEL is None:
        window = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)  # periodic Hann
        _MEL = window, mel_filters()
    window, filters = _MEL
    n = wave.shape[0]
    padded = -(-n // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    valid = np.zeros(padded + FRAME_LENGTH // 2, dtype=np.int32)
    valid[FRAME_LENGTH // 2:FRAME_LENGTH // 2 + n] = 1  # semicausal: 160 zeros in front
    x = np.zeros(padded + FRAME_LENGTH // 2, dtype=np.float32)
    x[FRAME_LENGTH // 2:FRAME_LENGTH // 2 + n] = wave
    size = FRAME_LENGTH + 1  # the reference unfolds 321 samples and drops the last (no pre-emphasis)
    count = (x.shape[0] - size) // HOP_LENGTH + 1
    frames = np.lib.stride_tricks.as_strided(x, (count, size), (x.strides[0] * HOP_LENGTH, x.strides[0]))
    spectrum = np.abs(np.fft.rfft(frames[:, :-1] * window, n=FFT_LENGTH, axis=-1))
    feats = np.log(spectrum @ filters + np.array(MEL_FLOOR, dtype=np.float64)).astype(np.float32)
    # A frame is real when its whole window is real audio: look at its last sample.
    mask = valid[np.arange(count) * HOP_LENGTH + size - 1].astype(bool)
    return feats * mask[:, None], mask


def preprocess_audio(src, sampling_rate: int | None = None) -> AudioInput:
    """Any `load_audio` source -> AudioInput (log-mel features, mask and soft-token count)."""
    wave = load_audio(src, sampling_rate)
    feats, mask = log_mel(wave)
    return AudioInput(feats, mask, num_audio_tokens(wave.shape[0]), wave.shape[0], waveform=wave)


def pad_audio(items) -> tuple[np.ndarray, np.ndarray]:
    """Stack clips as the reference batches them: features [N, T_max, 128] (zero padded), mask [N, T_max]."""
    T = max(it.features.shape[0] for it in items)
    feats = np.zeros((len(items), T, MEL_BINS), np.float32)
    mask = np.zeros((len(items), T), bool)
    for i, it in enumerate(items):
        feats[i, :len(it.features)], mask[i, :len(it.mask)] = it.features, it.mask
    return feats, mask


# ---- prompt expansion ----------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"<\|(image|audio|video)\|>")


def media_replacement(item) -> str:
    """The text that replaces one media item's placeholder (the reference processor's exact form)."""
    if item.kind == "image":
        return BOI + IMAGE_TOKEN * item.num_tokens + EOI
    if item.kind == "audio":
        return BOA + AUDIO_TOKEN * item.num_tokens + EOA
    if item.kind == "video":
        return " ".join(f"{video_timestamp(t)} {BOI}{VIDEO_TOKEN * item.tokens_per_frame}{EOI}"
                        for t in item.timestamps)
    raise MediaError(f"unknown media kind {item.kind!r}")


def expand_media_tokens(prompt_text: str, media_items) -> str:
    """Replace each bare `<|image|>` / `<|audio|>` / `<|video|>` the chat template wrote (one per media item,
    in order) by the item's full marker sequence: `<|image>` + N x `<|image|>` + `<image|>`, `<|audio>` ...
    `<audio|>`, or per video frame `mm:ss <|image>` + N x `<|video|>` + `<image|>` joined by spaces."""
    items = list(media_items)
    found = [m.group(1) for m in _PLACEHOLDER.finditer(prompt_text)]
    if len(found) != len(items):
        raise MediaError(f"the prompt has {len(found)} media placeholder(s) but {len(items)} media item(s) "
                         f"were given")
    for n, (kind, item) in enumerate(zip(found, items)):
        if kind != item.kind:
            raise MediaError(f"media placeholder {n + 1} is <|{kind}|> but item {n + 1} is {item.kind}")
    it = iter(items)
    return _PLACEHOLDER.sub(lambda m: media_replacement(next(it)), prompt_text)
