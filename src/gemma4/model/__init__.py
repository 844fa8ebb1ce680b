"""The whole Gemma 4 model: the text decoder, plus (in their own modules) the vision and audio towers."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .text import TextModel


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    lo, hi = input_ids.min().item(), input_ids.max().item()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, {vocab_size})")


class Gemma4(nn.Module):
    """`model(input_ids, attention_mask)` -> logits [B, S, vocab], as the reference's
    Gemma4ForConditionalGeneration (or Gemma4ForCausalLM for a text-only checkpoint) computes them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        # Multimodal placeholder ids embed as the pad token until an encoder fills them in, and take
        # PLE row 0 (the pad id) even then, as the reference does.
        self.init_buffers()

    def init_buffers(self, device=None):
        """(Re)build the non-checkpoint buffers, e.g. after the model was built on the meta device."""
        ids = [self.config.token_ids.get(k) for k in ("image_token_id", "video_token_id", "audio_token_id")]
        self.register_buffer("placeholder_ids", torch.tensor([i for i in ids if i is not None], dtype=torch.long,
                                                             device="cpu").to(device or "cpu"), persistent=False)
        self.language_model.init_buffers(device)

    @property
    def dtype(self) -> torch.dtype:  # the compute dtype (norm weights are never quantized)
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    def embed(self, input_ids: torch.Tensor):
        """input ids [B, T] -> (scaled embeddings [B, T, E], ids for the PLE lookup [B, T])."""
        text_ids = input_ids
        if self.placeholder_ids.numel():
            is_media = torch.isin(input_ids, self.placeholder_ids)
            text_ids = input_ids.masked_fill(is_media, self.config.text.pad_token_id)
        return self.language_model.embed(text_ids), text_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
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
        embeds, ple_ids = self.embed(input_ids)
        hidden = self.language_model(embeds, ple_ids, positions, key_valid=valid)
        return self.language_model.logits(hidden)
