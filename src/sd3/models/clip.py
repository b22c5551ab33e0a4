"""CLIP text encoders of SD3 / SD3.5: OpenAI CLIP ViT-L/14 ("CLIP-L") and OpenCLIP ViT-bigG/14 ("CLIP-G").

Both are the same pre-LN causal transformer; they differ in size and activation
(CLIP-L: 12 layers, width 768, quick_gelu; CLIP-G: 32 layers, width 1280, exact gelu).
SD3 takes two outputs from each (as in Stability's reference `sd3_impls.py`):
the penultimate layer's hidden states (the token-wise context) and the final-normed
hidden state at the EOS token (the pooled vector). Parameter names follow transformers'
`CLIPTextModelWithProjection`, which is how the official checkpoints store them.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation
    "gelu": F.gelu,  # OpenCLIP uses the exact (erf) GELU
}


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_positions: int = 77
    mlp_width: int = 3072
    hidden_act: str = "quick_gelu"
    has_projection: bool = True
    # SD3 uses CLIP-G's pooled output projected and CLIP-L's unprojected
    # (Stability's reference gives CLIP-L only a placeholder identity text_projection).
    project_pooled: bool = False

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {list(ACTIVATIONS)}")
        if self.layers < 1:
            raise ValueError(f"CLIP needs at least one layer, got layers={self.layers}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.project_pooled and not self.has_projection:
            raise ValueError("project_pooled=True needs a text_projection (has_projection=False)")

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, Sequence[int]],
        hidden_act: str,
        project_pooled: bool = False,
    ) -> "CLIPConfig":
        """Infer the config from `{key: shape}` in transformers naming (no file prefix).

        The activation is not visible in the shapes: pass "quick_gelu" for CLIP-L, "gelu" for
        CLIP-G. Pass `project_pooled=True` for CLIP-G (SD3 projects only CLIP-G's pooled output).
        """
        emb = "text_model.embeddings."
        for key in (emb + "token_embedding.weight", emb + "position_embedding.weight"):
            if key not in shapes:
                raise ValueError(f"not a CLIP text encoder: missing key {key!r}")
        vocab_size, width = shapes[emb + "token_embedding.weight"]
        layer_ids = {
            int(m[1]) for k in shapes if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))
        }
        if not layer_ids or layer_ids != set(range(len(layer_ids))):
            raise ValueError(f"CLIP layer indices must be 0..N-1, got {sorted(layer_ids)}")
        if width % 64:
            raise ValueError(f"CLIP width {width} is not a multiple of the head dim 64")
        return cls(
            vocab_size=vocab_size,
            width=width,
            layers=len(layer_ids),
            heads=width // 64,
            max_positions=shapes[emb + "position_embedding.weight"][0],
            mlp_width=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
            hidden_act=hidden_act,
            has_projection="text_projection.weight" in shapes,
            project_pooled=project_pooled,
        )


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width) for _ in range(4)
        )

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(x.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, hidden_act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)
        self.act = ACTIVATIONS[hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width)
        self.self_attn = CLIPAttention(config.width, config.heads)
        self.layer_norm2 = nn.LayerNorm(config.width)
        self.mlp = CLIPMLP(config.width, config.mlp_width, config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, input_ids: Tensor) -> Tensor:
        return (
            self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]
        )


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.layers))


class CLIPTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)


class CLIPTextModel(nn.Module):
    """CLIP text transformer returning SD3's (penultimate hidden states, pooled)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTransformer(config)
        if config.has_projection:
            self.text_projection = nn.Linear(config.width, config.width, bias=False)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids [B, T] (T <= max_positions) -> (hidden [B, T, width], pooled [B, width]).

        `hidden` is the input to the last layer, without the final LayerNorm. `pooled` is the
        final-normed output of the last layer at the EOS token, found as the largest id in each
        row (EOS = 49407 is the largest id in CLIP's vocabulary; the first one if padded with EOS).
        """
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"input_ids must be [batch, <= {self.config.max_positions}], got {tuple(input_ids.shape)}"
            )
        tm = self.text_model
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers[:-1]:
            x = layer(x)
        hidden = x
        x = tm.final_layer_norm(tm.encoder.layers[-1](x))
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        if self.config.project_pooled:
            pooled = self.text_projection(pooled)
        return hidden, pooled
