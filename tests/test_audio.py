"""Audio tower (Conformer), merge and logits against the reference (transformers) on a tiny random E2B
checkpoint with both towers; images, video and audio interleaved in one prompt; audio on a model without
an audio tower is a MediaError."""
import numpy as np
import pytest
import torch

import gemma4
from gemma4 import media
from gemma4.media import MediaError

pytest.importorskip("transformers")
import reference  # noqa: E402
from test_vision import assert_close, image, make_video, mm_types  # noqa: E402

TOK = reference.MEDIA_TOKENS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_vision.one_thread
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("e2b-av"))
    ref = reference.build_media("e2b", out, vision=reference.VISION_EDGE, audio=reference.AUDIO_RUN)
    return out, ref, gemma4.load(out, dtype="float32", device="cpu")


def tone(seconds, freq=440.0, seed=0):
    n = int(seconds * media.SAMPLE_RATE)
    t = np.arange(n) / media.SAMPLE_RATE
    rng = np.random.default_rng(seed)
    return (0.4 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_encoder_matches_reference(e2b):
    _, ref, model = e2b
    clips = [media.preprocess_audio(tone(s, f, i)) for i, (s, f) in enumerate(((1.0, 440), (0.43, 300), (2.2, 950)))]
    assert [c.num_tokens for c in clips] == [25, 11, 55]
    feats, mask = (torch.from_numpy(a) for a in media.pad_audio(clips))
    with torch.no_grad():
        out = ref.model.get_audio_features(feats, mask)
        ours = model.encode_audio(feats, mask)  # the reference's padded batch
        for i, clip in enumerate(clips):
            theirs = out.pooler_output[i][out.attention_mask[i]]
            assert theirs.shape == (clip.num_tokens, 64)
            assert_close(ours[i], theirs, 1e-5)
            assert_close(model.encode_media([clip]), theirs, 1e-5)  # one clip alone, unpadded batch


def test_clipping_is_exercised(e2b):
    _, _, model = e2b
    clip = media.preprocess_audio(tone(1.0))
    tower = model.audio_tower
    with torch.no_grad():
        before = model.encode_media([clip])
        saved = {n: b.clone() for n, b in tower.named_buffers() if n.endswith(("_min", "_max"))}
        for n, b in tower.named_buffers():
            if n in saved:
                b.fill_(-np.inf if n.endswith("_min") else np.inf)
        after = model.encode_media([clip])
        for n, b in tower.named_buffers():
            if n in saved:
                b.copy_(saved[n])
    assert saved and (before - after).abs().max() > 1e-3


def interleaved(model_items):
    """Token ids for text, then each item's expansion (boa/audio.../eoa, boi/image.../eoi, frames)."""
    ids = [2, 105, 30]
    for it in model_items:
        if it.kind == "audio":
            ids += [TOK["boa_token_id"]] + [TOK["audio_token_id"]] * it.num_tokens + [TOK["eoa_token_index"]]
        elif it.kind == "image":
            ids += [TOK["boi_token_id"]] + [TOK["image_token_id"]] * it.num_tokens + [TOK["eoi_token_id"]]
        else:
            for _ in it.timestamps:
                ids += [33, TOK["boi_token_id"]] + [TOK["video_token_id"]] * it.tokens_per_frame + [TOK["eoi_token_id"]]
        ids += [40, 41]
    return torch.tensor([ids + list(range(50, 60))])


def test_interleaved_audio_image_video_logits_and_greedy(e2b):
    """audio, image, video, audio in one E2B prompt: logits and 8 greedy tokens equal the reference's."""
    _, ref, model = e2b
    items = [media.preprocess_audio(tone(0.8, 500, 1)), media.preprocess_image(image(60, 90, 1), 70),
             media.load_video(make_video(0.3)), media.preprocess_audio(tone(1.3, 700, 2))]
    ids = interleaved(items)
    text = media.expand_media_tokens("a<|audio|>b<|image|>c<|video|>d<|audio|>", items)
    assert text.count("<|audio|>") == items[0].num_tokens + items[3].num_tokens
    feats, fmask = (torch.from_numpy(a) for a in media.pad_audio([items[0], items[3]]))
    ipv, ipos = (torch.from_numpy(a) for a in media.pad_patches([items[1]]))
    vpv, vpos = (torch.from_numpy(a) for a in media.pad_patches([items[2]]))
    kwargs = dict(pixel_values=ipv, image_position_ids=ipos, pixel_values_videos=vpv, video_position_ids=vpos,
                  input_features=feats, input_features_mask=fmask)
    with torch.no_grad():
        theirs = ref(input_ids=ids, num_frames_per_video=torch.tensor([3]), mm_token_type_ids=mm_types(ids),
                     **kwargs).logits
        assert_close(model(ids, **kwargs), theirs)
        soft = model.encode_media(items)
        assert_close(model(ids, media=soft), theirs)
    expected = ref.generate(ids, num_frames_per_video=torch.tensor([3]), mm_token_type_ids=mm_types(ids),
                            max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    out = ids
    with torch.no_grad():
        for _ in range(8):
            out = torch.cat([out, model(out, media=soft)[0, -1].argmax().view(1, 1)], dim=1)
    assert out[0, ids.shape[1]:].tolist() == expected[0, ids.shape[1]:].tolist()


def test_media_slots_take_ple_row_zero(e2b):
    """A media slot's PLE comes from the pad id whatever is scattered into it."""
    _, _, model = e2b
    ids = interleaved([media.preprocess_audio(tone(0.5))])
    embeds, ple_ids = model.embed(ids, torch.randn(13, 64))
    slots = ids == TOK["audio_token_id"]
    assert (ple_ids[slots] == 0).all() and (ple_ids[~slots] == ids[~slots]).all()


def test_audio_on_a_model_without_audio_tower(tmp_path):
    reference.build_media("31b", str(tmp_path), vision=reference.VISION_LARGE)
    model = gemma4.load(str(tmp_path), dtype="float32", device="cpu")
    clip = media.preprocess_audio(tone(0.5))
    with pytest.raises(MediaError, match="26B-A4B and 31B have no audio"):
        model.encode_media([clip])
    with pytest.raises(MediaError, match="no audio tower"):
        model(interleaved([clip]), input_features=clip.features[None], input_features_mask=clip.mask[None])
