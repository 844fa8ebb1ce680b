"""gemma4.media against the reference processor (transformers): pixel values, soft-token counts, log-mel
features and prompt expansion, on images / tones / videos generated here; bad media -> MediaError."""
import base64
import io
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from gemma4 import media
from gemma4.media import MediaError

pytest.importorskip("transformers")
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor  # noqa: E402

# The processor's own replacement methods, bound to a stand-in (the real processor needs torchvision).
FAKE = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>", video_token="<|video|>",
                       boa_token="<|audio>", eoa_token="<audio|>", audio_token="<|audio|>", audio_seq_length=750,
                       feature_extractor=SimpleNamespace(frame_length=320, hop_length=160))


def noise_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    # smooth structure plus noise, so that resampling errors would show
    arr = (arr // 2 + (np.add.outer(np.arange(h), np.arange(w)) % 128)[..., None]).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def png_bytes(im, **kw):
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def reference_pixels(im, budget):
    out = Gemma4ImageProcessorPil(max_soft_tokens=budget)([im])
    return out["pixel_values"][0], out["image_position_ids"][0], out["num_soft_tokens_per_image"][0]


def assert_same_as_reference(item, im, budget):
    pv, pos, n = reference_pixels(im, budget)
    ours_pv, ours_pos = media.pad_patches([item])
    assert item.num_tokens == n
    assert np.array_equal(ours_pos[0], pos)
    assert np.array_equal(ours_pv[0], pv), f"max diff {np.abs(ours_pv[0] - pv).max()}"


# ---- images ----------------------------------------------------------------------------------------------------
# (H, W): square, 4:3 both ways, 16:9, tall, very tall, very wide (one token row), tiny, 1 px
SIZES = [(224, 224), (768, 1024), (1024, 768), (1080, 1920), (300, 100), (500, 30), (32, 1000), (10, 7), (1, 1)]


@pytest.mark.parametrize("budget", media.IMAGE_BUDGETS)
def test_image_pixels_and_counts_match_reference(budget):
    for i, (h, w) in enumerate(SIZES):
        im = noise_image(h, w, seed=i)
        assert_same_as_reference(media.preprocess_image(im, budget), im, budget)


def test_huge_image_matches_reference():
    im = noise_image(3000, 4000, seed=3)
    item = media.preprocess_image(png_bytes(im), 280)  # through bytes: load_image + processor
    assert item.size == (672, 912) and item.num_tokens == 266
    assert_same_as_reference(item, im, 280)


def test_soft_token_table_of_format_md():
    """FORMAT.md §7.5: input H x W -> resized H' x W' -> N, per budget."""
    table = {(224, 224): [(384, 384, 64), (528, 528, 121), (768, 768, 256), (1104, 1104, 529), (1584, 1584, 1089)],
             (1080, 1920): [(288, 528, 66), (384, 720, 120), (576, 1056, 264), (816, 1488, 527), (1200, 2112, 1100)],
             (500, 30): [(1632, 96, 68), (2304, 96, 96), (3264, 192, 272), (4608, 240, 480), (6528, 384, 1088)],
             (32, 1000): [(48, 2208, 46), (96, 3168, 132), (96, 4464, 186), (192, 6336, 528), (240, 8976, 935)]}
    for (h, w), rows in table.items():
        for budget, (th, tw, n) in zip(media.IMAGE_BUDGETS, rows):
            assert media.image_target_size(h, w, budget) == (th, tw)
            assert media.num_image_tokens(h, w, budget) == n
    assert media.DEFAULT_IMAGE_BUDGET == Gemma4ImageProcessorPil().max_soft_tokens == 280


def test_alpha_palette_gray_and_exif_as_reference():
    from transformers.image_utils import load_image as ref_load_image

    rgba = noise_image(90, 60, "RGBA", seed=5)
    gray = noise_image(50, 80, "L", seed=6)
    pal = noise_image(40, 40, seed=7).convert("P")
    pal.info["transparency"] = 3
    for im in (rgba, gray, pal):  # a PIL image as is: the processor composites alpha onto white
        assert_same_as_reference(media.preprocess_image(im, 70), im, 70)
    # encoded: the reference's load_image applies the EXIF orientation, then convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    jpeg = io.BytesIO()
    noise_image(60, 100, seed=8).save(jpeg, format="JPEG", exif=exif)
    for data in (jpeg.getvalue(), png_bytes(rgba)):
        item = media.preprocess_image(data, 140)
        ref_im = ref_load_image("data:image/png;base64," + base64.b64encode(data).decode())
        assert_same_as_reference(item, ref_im, 140)
    assert media.preprocess_image(jpeg.getvalue(), 140).size == media.image_target_size(100, 60, 140)


def test_image_sources(tmp_path):
    im = noise_image(64, 96, seed=9)
    data = png_bytes(im)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    items = [media.preprocess_image(src, 70) for src in (im, data, str(path), path, url, np.asarray(im))]
    for it in items[1:]:
        assert np.array_equal(it.pixel_values, items[0].pixel_values)


# ---- expansion -------------------------------------------------------------------------------------------------
def test_expansion_matches_reference_processor():
    img = media.preprocess_image(noise_image(768, 1024), 280)
    assert media.media_replacement(img) == Gemma4Processor.replace_image_token(
        FAKE, {"num_soft_tokens_per_image": [img.num_tokens]}, 0)
    assert img.num_tokens == 266
    wave = np.zeros(38560, np.float32)
    aud = media.preprocess_audio(wave)
    assert media.media_replacement(aud) == Gemma4Processor.replace_audio_token(
        FAKE, {"input_features_mask": [aud.mask]}, 0)
    assert aud.num_tokens == Gemma4Processor._compute_audio_num_tokens(FAKE, wave, 16000) == 60
    meta = SimpleNamespace(fps=30.0, timestamps=[0.0, 1.5, 59.9, 61.0, 125.7])
    vid = SimpleNamespace(kind="video", tokens_per_frame=66, timestamps=meta.timestamps)
    expected = Gemma4Processor.replace_video_token(
        FAKE, {"num_soft_tokens_per_video": [66], "video_metadata": [meta]}, 0)
    assert media.media_replacement(vid) == expected
    assert expected.startswith("00:00 <|image><|video|>") and " 02:05 <|image>" in expected

    prompt = "<bos><|turn>user\n<|image|>Compare with <|audio|> and <|video|>, then <|image|>.<turn|>\n"
    out = media.expand_media_tokens(prompt, [img, aud, vid, img])
    assert out == ("<bos><|turn>user\n" + media.media_replacement(img) + "Compare with " + media.media_replacement(aud)
                   + " and " + expected + ", then " + media.media_replacement(img) + ".<turn|>\n")
    with pytest.raises(MediaError, match="2 media placeholder"):
        media.expand_media_tokens("<|image|><|image|>", [img])
    with pytest.raises(MediaError, match="is <\\|audio\\|> but item 1 is image"):
        media.expand_media_tokens("<|audio|>", [img])


# ---- audio features ----------------------------------------------------------------------------------------------
def test_log_mel_matches_reference_feature_extractor():
    from transformers import Gemma4AudioFeatureExtractor

    fe = Gemma4AudioFeatureExtractor()
    rng = np.random.default_rng(0)
    for n in (161, 800, 12345, 16000, 48000, 160_017, 480_000):
        t = np.arange(n) / 16000
        wave = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)
                + 0.05 * rng.standard_normal(n)).astype(np.float32)
        ours = media.preprocess_audio(wave)
        ref = fe([wave], return_tensors="np")
        assert np.array_equal(ours.features, ref["input_features"][0])
        assert np.array_equal(ours.mask, ref["input_features_mask"][0])
        assert ours.num_tokens == Gemma4Processor._compute_audio_num_tokens(FAKE, wave, 16000)
    # golden counts (transformers' tests; FORMAT.md §5.3)
    for samples, n in ((38560, 60), (48000, 75), (48800, 76), (99360, 155), (16000, 25), (8000, 13), (480000, 750)):
        assert media.num_audio_tokens(samples) == n


# ---- video -------------------------------------------------------------------------------------------------------
def make_video(seconds=1.0, fps=10, h=72, w=128, fmt="mp4", codec="mpeg4"):
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        y, x = np.mgrid[0:h, 0:w]
        for i in range(int(round(seconds * fps))):
            img = np.stack([(x * 2 + i * 9) % 256, (y * 3 + i * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_video_sampling_matches_reference(tmp_path):
    """Frame indices, decoded frames and timestamps as transformers' PyAV reader + default sampler give them;
    every frame is then an image at budget 70 (resize: torchvision's uint8 bicubic+antialias, done with torch)."""
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    path = tmp_path / "v.mp4"
    path.write_bytes(make_video(seconds=4.0, fps=10))
    v = media.load_video(str(path))
    frames, meta = read_video_pyav(str(path), lambda metadata, **kw: default_sample_indices_fn(metadata, 32))
    assert meta.total_num_frames == 40 and meta.fps == 10.0
    assert list(meta.frames_indices) == [i * 40 // 32 for i in range(32)]
    assert v.timestamps == pytest.approx(meta.timestamps)
    assert v.size == (288, 528) and v.tokens_per_frame == 66 and v.pixel_values.shape == (32, 594, 768)
    import torch

    raw = media.resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), 288, 528)
    ours = media.patchify(raw[5].permute(1, 2, 0).numpy().astype(np.float32) / 255)[0]
    assert np.array_equal(ours, v.pixel_values[5])
    # a clip shorter than 32 frames: every frame (the reference raises here)
    short = media.load_video(make_video(seconds=0.5, fps=10))
    assert short.timestamps == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    text = media.expand_media_tokens("<|video|>", [short])
    assert text.count("<|video|>") == 5 * 66 and text.count("<|image>") == 5 and text.startswith("00:00 <|image>")


def test_bad_video():
    with pytest.raises(MediaError, match="at most 60 s"):
        media.load_video(make_video(seconds=61, fps=2, h=48, w=48))
    data = make_video(seconds=2.0)
    with pytest.raises(MediaError):
        media.load_video(data[: len(data) // 3])  # MP4: the index (moov) is at the end
    mkv = make_video(seconds=2.0, fmt="matroska")
    assert media.load_video(mkv).pixel_values.shape[0] == 20  # no frame count in the header: counted
    with pytest.raises(MediaError, match="truncated"):
        media.load_video(mkv[: len(mkv) * 2 // 3])
    with pytest.raises(MediaError):
        media.load_video(b"\x00\x01garbage" * 100)
    with pytest.raises(MediaError, match="no video stream"):
        media.load_video(wav_bytes(np.zeros(1600, np.float32)))


def test_video_frames_over_the_pixel_limit_are_not_decoded(monkeypatch):
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 128 * 72 - 1)
    monkeypatch.setattr(media, "resize_frames", lambda *a: pytest.fail("a frame was decoded"))
    with pytest.raises(MediaError, match="MP limit"):
        media.load_video(make_video(seconds=0.5, w=128, h=72))


# ---- bad images and audio ------------------------------------------------------------------------------------------
def wav_bytes(wave, rate=16000, channels=1):
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def png_with_size(w, h):
    """A syntactically valid PNG header claiming w x h (for sizes PIL will not write)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bad_images(tmp_path):
    good = png_bytes(noise_image(64, 64))
    jpeg = io.BytesIO()
    noise_image(64, 64).save(jpeg, format="JPEG")
    cases = {
        "truncated": good[: len(good) // 2],
        "truncated jpeg": jpeg.getvalue()[:300],
        "corrupt": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "not an image": b"hello world, not an image",
        "zero width": png_with_size(0, 10),
        "bomb header": png_with_size(20000, 20000),
    }
    for name, data in cases.items():
        with pytest.raises(MediaError):
            media.preprocess_image(data)
    # a real decompression bomb: 108 MP of 1-bit pixels in a tiny PNG
    bomb = io.BytesIO()
    Image.new("1", (12000, 9000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(MediaError, match="100 MP"):
        media.preprocess_image(bomb.getvalue())
    with pytest.raises(MediaError, match="zero size"):
        media.preprocess_image(Image.new("RGB", (0, 0)))
    with pytest.raises(MediaError, match="zero size"):
        media.preprocess_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(MediaError, match="no such file"):
        media.preprocess_image(str(tmp_path / "missing.png"))
    with pytest.raises(MediaError, match="not fetched"):
        media.preprocess_image("https://example.com/x.png")
    with pytest.raises(MediaError, match="budget"):
        media.preprocess_image(good, budget=300)
    with pytest.raises(MediaError):
        media.preprocess_image(12345)


def test_bad_audio():
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    with pytest.raises(MediaError, match="44100 Hz"):
        media.preprocess_audio(tone, sampling_rate=44100)
    with pytest.raises(MediaError, match="at most 30 s"):
        media.preprocess_audio(np.zeros(16000 * 31, np.float32))
    with pytest.raises(MediaError, match="at most 30 s"):
        media.preprocess_audio(wav_bytes(np.zeros(44100 * 40, np.float32), rate=44100))
    with pytest.raises(MediaError, match="empty"):
        media.preprocess_audio(np.zeros(0, np.float32))
    with pytest.raises(MediaError, match="too short"):
        media.preprocess_audio(np.zeros(100, np.float32))
    with pytest.raises(MediaError, match="NaN"):
        media.preprocess_audio(np.full(1600, np.nan, np.float32))
    data = wav_bytes(tone)
    for bad in (data[:30], b"RIFF\x00\x00\x00\x00WAVEjunk" * 10, b"not audio at all" * 50):
        with pytest.raises(MediaError):
            media.preprocess_audio(bad)
    with pytest.raises(MediaError, match="truncated"):
        media.preprocess_audio(data[: len(data) // 2])


def test_audio_bombs(monkeypatch):
    """Rates whose exact resampling filter would take gigabytes (44,101 Hz: 706 million taps), rates past
    384 kHz, more decoded samples than the budget, and compressed audio past 30 s: refused before the work."""
    with pytest.raises(MediaError, match="44101 Hz cannot be resampled"):
        media.preprocess_audio(wav_bytes(np.zeros(441, np.float32), rate=44101))
    with pytest.raises(MediaError, match="sample rate 500000 Hz is not supported"):
        media.preprocess_audio(wav_bytes(np.zeros(500, np.float32), rate=500_000))
    for rate in (8000, 11025, 22050, 44100, 48000, 96000, 44056):  # common rates (and NTSC's) resample
        assert media.load_audio(wav_bytes(np.zeros(rate // 10, np.float32), rate=rate)).shape == (1600,)
    import av

    buf = io.BytesIO()  # 32 s of AAC: no duration before decoding; refused as the decoder passes 31 s
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000 * 32), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    with pytest.raises(MediaError, match="at most 30 s"):
        media.load_audio(buf.getvalue())
    monkeypatch.setattr(media, "MAX_AUDIO_SAMPLES", 16000)
    with pytest.raises(MediaError, match="too large to decode"):
        media.load_audio(wav_bytes(np.zeros((9000, 2), np.float32)))


def test_audio_files():
    """WAV / FLAC through soundfile, another container through PyAV; stereo is averaged; other rates resampled."""
    import soundfile as sf

    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert np.array_equal(media.load_audio(wav_bytes(tone)), tone)
    stereo = np.stack([tone, 0.5 * tone], axis=1)
    assert np.allclose(media.load_audio(wav_bytes(stereo)), 0.75 * tone, atol=1e-7)
    flac = io.BytesIO()
    sf.write(flac, tone, 16000, format="FLAC")
    assert np.allclose(media.load_audio(flac.getvalue()), tone, atol=1e-4)  # 16-bit
    # 44.1 kHz: resampled to 16 kHz, length ceil(n * 16000 / 44100), the tone stays at 440 Hz
    t44 = np.arange(44100) / 44100
    wave = media.load_audio(wav_bytes((0.3 * np.sin(2 * np.pi * 440 * t44)).astype(np.float32), rate=44100))
    assert wave.shape == (16000,)
    assert np.argmax(np.abs(np.fft.rfft(wave))) == 440
    assert np.abs(wave[1000:-1000] - tone[1000:-1000]).max() < 0.01
    # a format soundfile cannot read: PyAV decodes it
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    decoded = media.load_audio(buf.getvalue())
    assert abs(decoded.shape[0] - 16000) < 2048 and np.argmax(np.abs(np.fft.rfft(decoded[:16000]))) == 440
