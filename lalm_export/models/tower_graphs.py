"""The audio graphs of published audio-LLM checkpoints: each architecture's audio tower and
projector as the LALM bundle's `audio_encoder.onnx` takes them (its features and each clip's
length in samples → projected positions and how many are the clip's own)."""

from __future__ import annotations

import torch
from torch import nn

from lalm_export.models.families import FamilySpec


class Qwen2AudioTowerGraph(nn.Module):
    """Qwen2-Audio's audio tower and projector as the LALM bundle's audio graph: log-mel windows
    `(batch, 128, 3000)` and each clip's length in samples → projected positions and how many
    are each clip's own. The window's padding is masked in the tower's attention, as the
    checkpoint's own forward does from its processor's feature mask.

    Run eagerly it is the checkpoint's own code over the whole window. Traced for export, it
    runs the same layers over the frames of the window up to the batch's longest clip (and the
    two past it its convolutions read): the masked rest cannot change a clip's own positions,
    and a 10 s clip costs a third of the 30 s window. The parity gate compares the two."""

    def __init__(self, tower: nn.Module, projector: nn.Module, spec: FamilySpec, hop_length: int) -> None:
        super().__init__()
        self.encoder, self.projector, self.spec, self.hop_length = tower, projector, spec, hop_length

    def lengths(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions after the convolutions, positions after the pooling) of clips of `samples`."""
        window = int(self.encoder.config.max_source_positions) * 2  # mel frames: the tower's input length
        mel = torch.clamp((samples + self.hop_length - 1) // self.hop_length, max=window)
        convolved = (mel - 1) // 2 + 1
        return convolved, (convolved - 2) // 2 + 1

    def forward(self, input_features: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        convolved, pooled = self.lengths(audio_lengths)
        if torch.jit.is_tracing():
            hidden = self.cropped_tower(input_features, convolved)
        else:
            mask = padding_mask(convolved, int(self.encoder.config.max_source_positions), input_features.dtype)
            hidden = self.encoder(input_features, attention_mask=mask).last_hidden_state
        return self.projector(hidden), pooled

    def cropped_tower(self, features: torch.Tensor, convolved: torch.Tensor) -> torch.Tensor:
        """Qwen2AudioEncoder.forward over the window's first frames: those of the longest clip
        and the two past it that its strided convolution reads (as in the whole window)."""
        tower = self.encoder
        frames = torch.clamp(2 * convolved.max() + 2, max=features.shape[-1])
        hidden = nn.functional.gelu(tower.conv1(features[:, :, :frames]))
        hidden = nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + tower.embed_positions.weight[: hidden.shape[1]]
        mask = padding_mask(convolved, hidden.shape[1], hidden.dtype)
        for layer in tower.layers:
            hidden = layer(hidden, mask)
        hidden = tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
        return tower.layer_norm(hidden)


def padding_mask(convolved: torch.Tensor, positions: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(batch, 1, 1, positions)`: 0 for each clip's own positions, the dtype's minimum for the rest."""
    keep = torch.arange(positions, device=convolved.device)[None, :] < convolved[:, None]
    return torch.zeros(keep.shape, dtype=dtype, device=convolved.device).masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]


class VoxtralTowerGraph(nn.Module):
    """Voxtral's audio tower and projector as the LALM bundle's audio graph: log-mel windows
    `(batch, 128, 3000)` → the projector's positions, 4 tower frames each, all of them the
    clip's own (the checkpoint feeds the whole window, padding included, as its processor pads
    every clip to 30 s)."""

    def __init__(self, tower: nn.Module, projector: nn.Module, spec: FamilySpec) -> None:
        super().__init__()
        self.encoder, self.projector, self.spec = tower, projector, spec

    def forward(self, input_features: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_features).last_hidden_state
        grouped = hidden.reshape(hidden.shape[0], -1, int(self.encoder.config.intermediate_size))  # as the checkpoint's get_audio_features
        projected = self.projector(grouped)
        return projected, torch.full_like(audio_lengths, projected.shape[1])


class GraniteSpeechTowerGraph(nn.Module):
    """Granite Speech's conformer encoder and windowed Q-Former projector as the LALM bundle's
    audio graph: stacked log-mel `(batch, frames, 160)` and each clip's length in samples →
    `window // downsample` positions per window of `window` encoder frames, all of them the
    clip's own (its processor gives a clip `ceil((n // hop + 1) // 2 / window)` windows).

    Run eagerly it is the checkpoint's own code. Traced for export, the same layers run with
    their block padding computed from the traced length: the checkpoint's Python arithmetic
    on the length (`math.ceil`, `if remainder > 0`) would freeze the traced clip's length into
    the graph. The parity gate compares the two on clips of other lengths."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, spec: FamilySpec, hop_length: int) -> None:
        super().__init__()
        self.encoder, self.projector, self.spec, self.hop_length = encoder, projector, spec, hop_length

    def lengths(self, samples: torch.Tensor) -> torch.Tensor:
        """The projected positions of clips of `samples`, as the checkpoint's processor counts them."""
        window = self.projector.window_size
        frames = (samples // self.hop_length + 1) // 2
        return (frames + window - 1) // window * self.projector.num_queries

    def forward(self, input_features: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_tracing():
            projected = self.traced_projector(self.traced_encoder(input_features))
        else:
            projected = self.projector(self.encoder(input_features).last_hidden_state)
        return projected, self.lengths(audio_lengths)

    def traced_encoder(self, features: torch.Tensor) -> torch.Tensor:
        """GraniteSpeechCTCEncoder.forward with each block's attention as `block_attention`."""
        encoder = self.encoder
        hidden = encoder.input_linear(features)
        for index, layer in enumerate(encoder.layers, start=1):
            hidden = 0.5 * layer.ff1(hidden) + hidden
            hidden = block_attention(layer.attn, hidden, encoder.attention_dists) + hidden
            hidden = layer.conv(hidden) + hidden
            hidden = 0.5 * layer.ff2(hidden) + hidden
            hidden = layer.post_norm(hidden)
            if index == encoder.num_layers // 2:  # the checkpoint's mid-network CTC feedback
                hidden = hidden + encoder.out_mid(torch.softmax(encoder.out(hidden), dim=-1))
        return hidden

    def traced_projector(self, hidden: torch.Tensor) -> torch.Tensor:
        """GraniteSpeechEncoderProjector.forward with its windows padded by the traced length."""
        projector = self.projector
        windows = padded_to_blocks(hidden, projector.window_size).reshape(-1, projector.window_size, hidden.shape[-1])
        queries = projector.qformer(query_embeds=projector.query, encoder_hidden_states=windows, encoder_attention_mask=None, return_dict=True)
        return projector.linear(queries.last_hidden_state.reshape(hidden.shape[0], -1, queries.last_hidden_state.shape[-1]))


def padded_to_blocks(hidden: torch.Tensor, block: int) -> torch.Tensor:
    """`(batch, n, dim)` padded with zeros to a multiple of `block` positions, by tensor ops on
    the (traced) length."""
    length = hidden.shape[1]
    total = (length + block - 1) // block * block
    zeros = torch.zeros(hidden.shape[0], block, hidden.shape[2], dtype=hidden.dtype, device=hidden.device)
    return torch.cat([hidden, zeros], dim=1)[:, :total]


def block_attention(attention: nn.Module, hidden: torch.Tensor, dists: torch.Tensor) -> torch.Tensor:
    """GraniteSpeechConformerAttention.forward: attention within blocks of `context_size` frames
    with Shaw's relative positions, the last block's padding masked as keys (its padded rows are
    cut from the output, as the checkpoint cuts them)."""
    hidden = attention.pre_norm(hidden)
    batch, length, context = hidden.shape[0], hidden.shape[1], attention.context_size
    padded = padded_to_blocks(hidden, context)
    queries = attention.to_q(padded)
    keys, values = attention.to_kv(padded).chunk(2, dim=-1)
    heads = attention.num_heads
    queries, keys, values = (t.reshape(-1, context, heads, attention.dim_head).transpose(1, 2) for t in (queries, keys, values))
    positions = torch.einsum("b h c d, c r d -> b h c r", queries, attention.rel_pos_emb(dists)) * attention.scale
    valid = (torch.arange(padded.shape[1], device=hidden.device) < length).reshape(1, -1, 1, 1, context)
    blocks = positions.reshape(batch, -1, heads, context, context)
    positions = torch.where(valid, blocks, torch.full_like(blocks, -torch.finfo(blocks.dtype).max)).reshape(-1, heads, context, context)
    out = nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=positions, scale=attention.scale)
    out = out.transpose(1, 2).reshape(batch, padded.shape[1], -1)
    return attention.to_out(out[:, :length])


class PlaceholderAsToken(nn.Module):
    """A decoder's embedding that reads the audio placeholder's id as another token's: Granite
    Speech sets every placeholder id to 0 before its lookup, so a placeholder the model
    generates is embedded as token 0. The bundle's token table and the gate's eager decoder
    both look up through it."""

    def __init__(self, embedding: nn.Embedding, placeholder: int, as_id: int = 0) -> None:
        super().__init__()
        self.embedding, self.placeholder, self.as_id = embedding, placeholder, as_id

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(torch.where(ids == self.placeholder, torch.full_like(ids, self.as_id), ids))
