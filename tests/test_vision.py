"""Vision tower, merge and logits against the reference (transformers) on tiny random checkpoints: the edge
layout (clipped linears, E2B text) and the large layout (standardised output, 31B text with bidirectional
attention among the tokens of each image on sliding layers)."""

import numpy as np
import pytest
import torch
from PIL import Image

import gemma4
from gemma4 import media
from gemma4.media import MediaError

pytest.importorskip("transformers")
import reference  # noqa: E402
from test_media import make_video  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402

TOK = reference.MEDIA_TOKENS
VARIANTS = {"edge": ("e2b", reference.VISION_EDGE), "large": ("31b", reference.VISION_LARGE)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: with two threads on a shared 2-core machine each one waits on the other (16 ms instead
    of 0.04 ms for a [152, 64] x [64, 96] product)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    made = {}

    def get(variant):
        if variant not in made:
            shape, vision = VARIANTS[variant]
            out = str(tmp_path_factory.mktemp(f"vision-{variant}"))
            made[variant] = (out, reference.build_media(shape, out, vision=vision),
                             gemma4.load(out, dtype="float32", device="cpu"))
        return made[variant]

    return get


def image(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 3) % 256, (y * 2) % 256, (x + y) % 256], -1) // 2 + rng.integers(0, 128, (h, w, 3))
    return Image.fromarray(arr.astype(np.uint8))


def image_prompt(counts, kinds=None):
    """ids: text, then per image `boi, N x image, eoi` and a few text tokens."""
    ids = [2, 105, 30, 31]
    for n, kind in zip(counts, kinds or ["image"] * len(counts)):
        ids += [TOK["boi_token_id"]] + [TOK[f"{kind}_token_id"]] * n + [TOK["eoi_token_id"]] + [40, 41, 42]
    return torch.tensor([ids + list(range(50, 62))])


def mm_types(ids):
    return (ids == TOK["image_token_id"]).long() + 2 * (ids == TOK["video_token_id"]).long()


def assert_close(ours, ref, tol=1e-4):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} > {tol} x scale {scale:.3g}"
    return diff


@pytest.mark.parametrize("variant", ["edge", "large"])
def test_encoder_matches_reference(built, variant):
    _, ref, model = built(variant)
    imgs = [image(60, 90, 0), image(200, 40, 1), image(48, 48, 2)]
    for budget in (70, 140):
        batch = Gemma4ImageProcessorPil(max_soft_tokens=budget)(imgs, return_tensors="pt")
        with torch.no_grad():
            theirs = ref.model.get_image_features(batch["pixel_values"], batch["image_position_ids"]).pooler_output
            ours = model.encode_images(batch["pixel_values"], batch["image_position_ids"])
        for a, b, n in zip(ours, theirs, batch["num_soft_tokens_per_image"]):
            assert a.shape == b.shape == (n, 64)
            assert_close(a, b, 1e-6)  # same padded batch: bit-identical in practice
        # our own processing (unpadded, one image at a time) gives the same features
        with torch.no_grad():
            for im, b in zip(imgs, theirs):
                item = media.preprocess_image(im, budget)
                assert_close(model.encode_media([item]), b, 1e-5)


def test_clipping_and_standardisation_are_exercised(built):
    """The tiny checkpoints carry finite clip bounds and a random standardisation: both change the output."""
    pv, pos = media.pad_patches([media.preprocess_image(image(60, 90, 0), 70)])
    for variant, names in (("edge", ("input_min", "input_max", "output_min", "output_max")), ("large", ("std_",))):
        _, _, model = built(variant)
        with torch.no_grad():
            before = model.encode_images(pv, pos)[0]
            saved = {n: b.clone() for n, b in model.vision_tower.named_buffers() if any(k in n for k in names)}
            assert saved
            for n, b in model.vision_tower.named_buffers():
                if n in saved:
                    b.fill_({"input_min": -np.inf, "output_min": -np.inf, "std_bias": 0.0}.get(n.split(".")[-1], np.inf)
                            if "std_scale" not in n else 1.0)
            after = model.encode_images(pv, pos)[0]
            for n, b in model.vision_tower.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
        assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["edge", "large"])
def test_image_logits_match_reference(built, variant):
    _, ref, model = built(variant)
    imgs = [image(60, 90, 3), image(150, 40, 4)]
    batch = Gemma4ImageProcessorPil(max_soft_tokens=70)(imgs, return_tensors="pt")
    ids = image_prompt(batch["num_soft_tokens_per_image"])
    pv, pos = batch["pixel_values"], batch["image_position_ids"]
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=mm_types(ids)).logits
        assert_close(model(ids, pixel_values=pv, image_position_ids=pos), theirs)
        # our processor + encoder, the soft tokens merged in prompt order
        items = [media.preprocess_image(im, 70) for im in imgs]
        assert_close(model(ids, media=model.encode_media(items)), theirs)
        if variant == "large":  # the bidirectional image mask is in force (and matters) on this config
            causal = ref(input_ids=ids, pixel_values=pv, image_position_ids=pos).logits
            assert (causal - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["edge", "large"])
def test_greedy_tokens_match_reference(built, variant):
    _, ref, model = built(variant)
    imgs = [image(80, 60, 5), image(30, 200, 6)]
    items = [media.preprocess_image(im, 70) for im in imgs]
    ids = image_prompt([it.num_tokens for it in items])
    pv, pos = (torch.from_numpy(a) for a in media.pad_patches(items))
    expected = ref.generate(ids, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=mm_types(ids),
                            max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    soft = model.encode_media(items)
    out = ids
    with torch.no_grad():
        for _ in range(8):  # cache-free greedy decoding: the whole sequence each step
            nxt = model(out, media=soft)[0, -1].argmax()
            out = torch.cat([out, nxt.view(1, 1)], dim=1)
    assert out[0, ids.shape[1]:].tolist() == expected.tolist()


def test_video_and_images_interleaved_match_reference(built):
    """image, video (each frame its own bidirectional group), image in one prompt, large layout."""
    _, ref, model = built("large")
    video = media.load_video(make_video(0.6))  # 6 frames of 66 soft tokens
    imgs = [media.preprocess_image(image(50, 70, 7), 70), media.preprocess_image(image(64, 64, 8), 70)]
    prompt = "<bos>x<|image|>y<|video|>z<|image|>w"
    text = media.expand_media_tokens(prompt, [imgs[0], video, imgs[1]])
    assert text.count("<|video|>") == 6 * 66 and text.count("<|image>") == 2 + 6
    counts = [imgs[0].num_tokens] + [video.tokens_per_frame] * 6 + [imgs[1].num_tokens]
    ids = image_prompt(counts, ["image"] + ["video"] * 6 + ["image"])
    ipv, ipos = (torch.from_numpy(a) for a in media.pad_patches(imgs))
    vpv, vpos = (torch.from_numpy(a) for a in media.pad_patches([video]))
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=ipv, image_position_ids=ipos, pixel_values_videos=vpv,
                     video_position_ids=vpos, num_frames_per_video=torch.tensor([6]),
                     mm_token_type_ids=mm_types(ids)).logits
        assert_close(model(ids, pixel_values=ipv, image_position_ids=ipos, pixel_values_videos=vpv,
                           video_position_ids=vpos), theirs)
        assert_close(model(ids, media=model.encode_media([imgs[0], video, imgs[1]])), theirs)


def test_media_groups_and_text_only_load(built):
    path, _, model = built("edge")
    ids = torch.tensor([[1, 502, 502, 501, 7, 506, 506, 3, 502]])
    assert gemma4.model.media_groups(ids, torch.tensor([502, 506])).tolist() == [[0, 1, 1, 0, 0, 2, 2, 0, 3]]
    assert model.media_groups(ids) is None  # E2B: no bidirectional attention
    text_only = gemma4.load(path, dtype="float32", device="cpu", media=False)
    assert not hasattr(text_only, "vision_tower")
    with pytest.raises(MediaError, match="media=False"):
        text_only.encode_media([media.preprocess_image(image(48, 48, 0), 70)])
    # wrong number of soft-token rows for the slots
    with pytest.raises(ValueError, match="media slots"):
        model(image_prompt([64]), media=torch.zeros(10, 64))


@pytest.mark.parametrize("variant", ["edge", "large"])
def test_engine_with_images_matches_reference(built, variant):
    """The serving engine (paged cache, prompt chunks that never split an image, bidirectional image
    attention carried by the cache's plan on the large layout) gives the reference's greedy tokens."""
    from gemma4.engine.engine import Engine
    from gemma4.engine.sample import SamplingParams

    _, ref, model = built(variant)
    items = [media.preprocess_image(image(80, 60, 5), 70), media.preprocess_image(image(30, 200, 6), 70)]
    ids = image_prompt([it.num_tokens for it in items])
    pv, pos = (torch.from_numpy(a) for a in media.pad_patches(items))
    expected = ref.generate(ids, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=mm_types(ids),
                            max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    for chunk in (5, 512):  # 5: a chunk boundary would fall inside every image
        engine = Engine(model, block_size=4, max_step_tokens=chunk, stop_ids=())
        engine.add("r", ids[0].tolist(), SamplingParams(max_new_tokens=8), media=model.encode_media(items))
        out = []
        while engine.has_work():
            out += [ev.token_id for ev in engine.step()]
        assert out == expected.tolist(), chunk
