"""The whole Gemma 4 model: the text decoder, plus (in their own modules) the vision and audio towers."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .audio import AudioModel
from .text import TextModel
from .vision import MultimodalEmbedder, VisionModel


def media_groups(input_ids: torch.Tensor, vision_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: 1, 2, ... for each run of consecutive image / video soft-token slots (one image or one
    video frame), 0 elsewhere. The reference (`get_block_sequence_ids_for_mask`) numbers them the same way."""
    is_vision = torch.isin(input_ids, vision_ids)
    starts = is_vision & ~torch.nn.functional.pad(is_vision, (1, 0))[:, :-1]
    return torch.where(is_vision, starts.long().cumsum(-1), 0)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    lo, hi = input_ids.min().item(), input_ids.max().item()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, {vocab_size})")


def empty_model(config: ModelConfig, media: bool = True) -> Gemma4:
    """The module tree on the meta device, to be filled from a checkpoint, without the default random init.
    On meta that init computes nothing, but its first random op imports torch's Python meta kernels: ~800
    modules, +70 MB of resident memory for the whole run (E2B bf16 peak RSS 4.94 -> 4.82 GB)."""
    skipped = {name: getattr(nn.init, name) for name in ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_")}
    try:
        for name in skipped:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return Gemma4(config, media=media)
    finally:
        for name, fn in skipped.items():
            setattr(nn.init, name, fn)


class Gemma4(nn.Module):
    """`model(input_ids, attention_mask)` -> logits [B, S, vocab], as the reference's
    Gemma4ForConditionalGeneration (or Gemma4ForCausalLM for a text-only checkpoint) computes them."""

    def __init__(self, config: ModelConfig, media: bool = True):
        """`media`: build the vision / audio towers the config describes (False: the text decoder alone)."""
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        E = config.text.hidden_size
        if media and config.vision is not None:
            self.vision_tower = VisionModel(config.vision)
            s = self.vision_tower.settings
            self.embed_vision = MultimodalEmbedder(s["hidden_size"], E, s["rms_norm_eps"])
        if media and config.audio is not None:
            self.audio_tower = AudioModel(config.audio)
            s = self.audio_tower.settings
            self.embed_audio = MultimodalEmbedder(s["output_proj_dims"], E, s["rms_norm_eps"])
        # Multimodal placeholder ids embed as the pad token until an encoder fills them in, and take
        # PLE row 0 (the pad id) even then, as the reference does.
        self.init_buffers()

    def init_buffers(self, device=None):
        """(Re)build the non-checkpoint buffers, e.g. after the model was built on the meta device."""
        ids = [self.config.token_ids.get(k) for k in ("image_token_id", "video_token_id", "audio_token_id")]
        self.register_buffer("placeholder_ids", torch.tensor([i for i in ids if i is not None], dtype=torch.long,
                                                             device="cpu").to(device or "cpu"), persistent=False)
        self.language_model.init_buffers(device)
        for tower in ("vision_tower", "audio_tower"):
            if hasattr(self, tower):
                getattr(self, tower).init_buffers(device)

    @property
    def dtype(self) -> torch.dtype:  # the compute dtype (norm weights are never quantized)
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    # ---- media -------------------------------------------------------------------------------------------
    def _token_id(self, key: str) -> int:
        tid = self.config.token_ids.get(key)
        if tid is None:
            raise ValueError(f"config.json has no {key}: this checkpoint cannot take media")
        return tid

    def _tower(self, name: str, what: str):
        tower = getattr(self, name, None)
        if tower is None:
            from ..media import MediaError

            kind = name.split("_")[0]
            if getattr(self.config, kind) is not None:
                why = "the model was loaded with media=False"
            elif kind == "audio":
                why = "only Gemma 4 E2B / E4B take audio; 26B-A4B and 31B have no audio encoder"
            else:
                why = "the checkpoint has no vision_config"
            raise MediaError(f"{what} given, but this model has no {kind} tower: {why}")
        return tower

    def encode_images(self, pixel_values, positions) -> list[torch.Tensor]:
        """Patches [N, P, 3*16*16] in [0, 1] and positions [N, P, 2] ((-1, -1) = padding), as the processor
        (gemma4.media) makes them -> one [n_i, E_text] tensor of soft-token embeddings per image / frame."""
        tower = self._tower("vision_tower", "an image")
        dev = self.device
        pixel_values = torch.as_tensor(pixel_values).to(dev)
        positions = torch.as_tensor(positions).to(dev, torch.long)
        if pixel_values.dim() == 2:  # one image
            pixel_values, positions = pixel_values[None], positions[None]
        return [self.embed_vision(f) for f in tower(pixel_values, positions)]

    def encode_audio(self, features, mask=None) -> list[torch.Tensor]:
        """Log-mel features [N, T, 128] (+ mask [N, T], True = real frame) -> one [n_i, E_text] tensor per clip:
        the soft tokens of its real frames (padding frames are dropped, as the reference does)."""
        tower = self._tower("audio_tower", "audio")
        dev = self.device
        features = torch.as_tensor(features).to(dev)
        if features.dim() == 2:
            features = features[None]
            mask = None if mask is None else torch.as_tensor(mask)[None]
        mask = torch.ones(features.shape[:2], dtype=torch.bool) if mask is None else torch.as_tensor(mask)
        out, out_mask = tower(features.to(self.dtype), mask.to(dev).bool())
        return [self.embed_audio(o[m]) for o, m in zip(out, out_mask)]

    def encode_media(self, items) -> torch.Tensor:
        """Processed media (gemma4.media ImageInput / VideoInput / AudioInput), in prompt order ->
        [total soft tokens, E_text]: the rows for the placeholder slots, in the same order."""
        out = []
        for item in items:
            kind = getattr(item, "kind", None)
            if kind in ("image", "video"):
                feats = self.encode_images(item.pixel_values, item.positions)
            elif kind == "audio":
                feats = self.encode_audio(item.features, item.mask)
            else:
                raise TypeError(f"not a processed media item: {type(item).__name__} (use gemma4.media)")
            got = sum(f.shape[0] for f in feats)
            if got != item.num_tokens:
                raise ValueError(f"{kind}: the encoder gave {got} soft tokens, the prompt has {item.num_tokens}")
            out.extend(feats)
        if not out:
            return torch.zeros(0, self.config.text.hidden_size, dtype=self.dtype, device=self.device)
        return torch.cat(out).to(self.dtype)

    def embed(self, input_ids: torch.Tensor, media=None):
        """input ids [B, T] -> (embeddings [B, T, E], ids for the PLE lookup [B, T]).

        `media`: soft-token embeddings to put in the placeholder slots (`<|image|>`, `<|video|>`, `<|audio|>`
        ids), row-major over the batch: a [n_slots, E] tensor for all of them in order (`encode_media`), or a
        dict {token id: [n, E]} per kind (as the reference scatters images, videos and audio separately).
        Without it, a slot embeds as the pad token. Either way a slot takes PLE row 0 (pad), as the reference."""
        text_ids = input_ids
        is_media = torch.zeros_like(input_ids, dtype=torch.bool)
        if self.placeholder_ids.numel():
            is_media = torch.isin(input_ids, self.placeholder_ids)
            text_ids = input_ids.masked_fill(is_media, self.config.text.pad_token_id)
        embeds = self.language_model.embed(text_ids)
        if media is not None:
            parts = media.items() if isinstance(media, dict) else [(None, media)]
            for tid, rows in parts:
                slots = is_media if tid is None else input_ids == tid  # [B, T]
                n = int(slots.sum())
                if rows.shape[0] != n or rows.shape[-1] != embeds.shape[-1]:
                    raise ValueError(f"{n} media slots in the prompt but {tuple(rows.shape)} soft-token rows given "
                                     f"(expand the placeholders with gemma4.media.expand_media_tokens)")
                embeds = embeds.masked_scatter(slots[..., None], rows.to(embeds.device, embeds.dtype))
        return embeds, text_ids

    def media_groups(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The [B, T] image / frame group ids for the bidirectional sliding-layer mask, or None when the
        config does not ask for it (`use_bidirectional_attention: "vision"`, 26B/31B) or there is no image."""
        if self.config.text.bidirectional != "vision":
            return None
        ids = [self.config.token_ids.get(k) for k in ("image_token_id", "video_token_id")]
        ids = torch.tensor([i for i in ids if i is not None], dtype=input_ids.dtype, device=input_ids.device)
        groups = media_groups(input_ids, ids)
        return groups if bool(groups.any()) else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, *, media=None, pixel_values=None, image_position_ids=None,
                pixel_values_videos=None, video_position_ids=None, input_features=None,
                input_features_mask=None) -> torch.Tensor:
        """Logits [B, T, vocab] (see `hidden`)."""
        return self.language_model.logits(self.hidden(
            input_ids, attention_mask, positions, media=media, pixel_values=pixel_values,
            image_position_ids=image_position_ids, pixel_values_videos=pixel_values_videos,
            video_position_ids=video_position_ids, input_features=input_features,
            input_features_mask=input_features_mask))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, *, media=None, pixel_values=None, image_position_ids=None,
               pixel_values_videos=None, video_position_ids=None, input_features=None,
               input_features_mask=None) -> torch.Tensor:
        """The final-normed hidden states [B, T, E] that `forward` turns into logits (fine-tuning takes these).
        Media either as soft-token embeddings (`media`, see `embed`) or as the reference's processed tensors:
        images `pixel_values` [N, P, 768] + `image_position_ids` [N, P, 2], video frames `pixel_values_videos` +
        `video_position_ids` (all frames stacked), audio `input_features` [N, T, 128] + `input_features_mask`
        [N, T]; each fills its own kind of slot in order."""
        check_token_ids(input_ids, self.config.text.vocab_size)
        input_ids = input_ids.to(self.device)
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            valid = attention_mask.to(self.device).bool()
        if positions is None:
            # Padding (left or right) does not move a token's position: count the real tokens before it.
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0) if valid is not None else \
                torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        if media is None:
            media = {}
            if pixel_values is not None:
                media[self._token_id("image_token_id")] = torch.cat(self.encode_images(pixel_values,
                                                                                       image_position_ids))
            if pixel_values_videos is not None:
                media[self._token_id("video_token_id")] = torch.cat(self.encode_images(pixel_values_videos,
                                                                                       video_position_ids))
            if input_features is not None:
                media[self._token_id("audio_token_id")] = torch.cat(self.encode_audio(input_features,
                                                                                      input_features_mask))
            media = media or None
        embeds, ple_ids = self.embed(input_ids, media)
        return self.language_model(embeds, ple_ids, positions, key_valid=valid,
                                   media_groups=self.media_groups(input_ids))
