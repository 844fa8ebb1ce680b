"""Media encoder speed on this CPU: vision tower time per image at each soft-token budget, audio tower time
per second of audio. The towers have the published E2B / E4B sizes (vision ~150M with clipped linears,
Conformer ~300M, projectors into a 1536-wide text model), random weights built in-process: no download.

    python benchmarks/bench_media.py [--threads 2] [--dtype float32] [--budgets 70 140 280 560 1120]
                                     [--audio-seconds 1 10 30] [--large]

`--large` times the 26B/31B vision tower (~550M, standardised output) instead. Times are the best of a few
runs (other processes share this machine's cores) and include preprocessing of a generated image / tone.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from gemma4 import media
from gemma4.model.audio import AudioModel
from gemma4.model.vision import MultimodalEmbedder, VisionModel

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "gemma4", "configs")


def tower_configs(large: bool) -> tuple[dict, dict, int]:
    """(vision_config, audio_config, text width) of E2B (or 31B): the published config.json when the shared
    folder is there, else the same values written out."""
    name = "gemma-4-31b" if large else "gemma-4-e2b"
    for root in (CONFIGS, "/work/shared/gemma4/configs"):
        path = os.path.join(root, name, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
            return cfg["vision_config"], cfg.get("audio_config"), cfg["text_config"]["hidden_size"]
    if large:
        return (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=72, use_clipped_linears=False, standardize=True), None, 5376)
    return dict(use_clipped_linears=True), {}, 1536  # the towers' defaults are the E2B sizes


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)


def best_of(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--budgets", type=int, nargs="+", default=list(media.IMAGE_BUDGETS))
    ap.add_argument("--audio-seconds", type=float, nargs="+", default=[1, 10, 30])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--large", action="store_true", help="the 26B/31B vision tower (no audio)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    vcfg, acfg, text_hidden = tower_configs(args.large)

    vision = VisionModel(vcfg)
    s = vision.settings
    embed = MultimodalEmbedder(s["hidden_size"], text_hidden, s["rms_norm_eps"])
    randomise(vision), randomise(embed, 1)
    vision.to(dtype).eval(), embed.to(dtype).eval()
    print(f"vision tower: {params(vision) / 1e6:.0f}M parameters ({s['num_hidden_layers']} layers of "
          f"{s['hidden_size']}), {args.dtype}, {args.threads} thread(s)")
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)  # 4:3, as from a camera
    print(f"{'budget':>7} {'resized':>11} {'patches':>8} {'tokens':>7} {'preprocess':>11} {'encode':>9} "
          f"{'ms/token':>9}")
    with torch.no_grad():
        for budget in args.budgets:
            pre = best_of(lambda: media.preprocess_image(photo, budget), args.runs)
            item = media.preprocess_image(photo, budget)
            pv = torch.from_numpy(item.pixel_values)[None]
            pos = torch.from_numpy(item.positions)[None]

            def encode():
                return embed(vision(pv, pos)[0])

            runs = args.runs if budget <= 560 else 1  # 1120 takes about a minute on two cores
            if budget == args.budgets[0]:
                encode()  # warm-up (thread pool, allocator)
            t = best_of(encode, runs)
            h, w = item.size
            print(f"{budget:>7} {f'{h}x{w}':>11} {item.pixel_values.shape[0]:>8} {item.num_tokens:>7} "
                  f"{pre * 1e3:>9.1f}ms {t:>8.2f}s {t / item.num_tokens * 1e3:>9.1f}")

    if args.large or acfg is None:
        return
    audio = AudioModel(acfg)
    a = audio.settings
    aembed = MultimodalEmbedder(a["output_proj_dims"], text_hidden, a["rms_norm_eps"])
    randomise(audio, 2), randomise(aembed, 3)
    audio.to(dtype).eval(), aembed.to(dtype).eval()
    print(f"\naudio tower: {params(audio) / 1e6:.0f}M parameters ({a['num_hidden_layers']} Conformer layers of "
          f"{a['hidden_size']}), {args.dtype}")
    print(f"{'seconds':>7} {'frames':>7} {'tokens':>7} {'features':>9} {'encode':>9} {'per s of audio':>15}")
    with torch.no_grad():
        for i, seconds in enumerate(args.audio_seconds):
            n = int(seconds * media.SAMPLE_RATE)
            wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / media.SAMPLE_RATE)
                    + 0.05 * rng.standard_normal(n)).astype(np.float32)
            pre = best_of(lambda: media.preprocess_audio(wave), args.runs)
            clip = media.preprocess_audio(wave)
            feats = torch.from_numpy(clip.features)[None].to(dtype)
            mask = torch.from_numpy(clip.mask)[None]

            def encode():
                out, m = audio(feats, mask)
                return aembed(out[m])

            if i == 0:
                encode()
            t = best_of(encode, args.runs)
            print(f"{seconds:>7g} {clip.features.shape[0]:>7} {clip.num_tokens:>7} {pre * 1e3:>7.1f}ms "
                  f"{t:>8.2f}s {t / seconds * 1e3:>12.0f} ms")


if __name__ == "__main__":
    main()
