"""Tiny transformers architectures with random weights, exported as Shears receives them.

Every model is built from a transformers config (no hub access), wrapped so that it returns
``.logits``, and exported with a dynamic batch. Sizes are small (hidden 32-64, 2 layers) so the
whole zoo runs on a CPU in the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

IMAGE = (3, 32, 32)
TOKENS = 8
VOCAB = 96


class Logits(nn.Module):
    """``model(x).logits``: the tensor the service sees as the program's output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ZooModel:
    """A transformers architecture at test size; ``attention`` when it has heads to prune.

    ``heads_blocked``: where head pruning keeps every head by design, the reason the analysis
    gives for it."""

    name: str
    build: Callable[[], nn.Module]
    text: bool
    attention: bool
    heads_blocked: str = ""

    def example(self, batch: int = 2) -> torch.Tensor:
        if self.text:
            return torch.randint(0, VOCAB, (batch, TOKENS))
        return torch.randn(batch, *IMAGE)


_TEXT = {"vocab_size": VOCAB, "num_hidden_layers": 2, "max_position_embeddings": 32}


def _vision(config_cls: str, model_cls: str, **kw: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(num_labels=5, **kw)
        model: nn.Module = getattr(transformers, model_cls)(config)
        return model

    return build


def _text(
    config_cls: str, model_cls: str, attention: str = "sdpa", **kw: object
) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(**{**_TEXT, **kw})
        cls = getattr(transformers, model_cls)
        model: nn.Module = cls._from_config(config, attn_implementation=attention)
        return model

    return build


def _classifier(name: str, family: str, attention: bool, **kw: Any) -> ZooModel:
    """An image classifier from ``{family}Config`` and ``{family}ForImageClassification``."""
    build = _vision(f"{family}Config", f"{family}ForImageClassification", **kw)
    return ZooModel(name, build, text=False, attention=attention)


def _decoder(
    name: str, family: str, config: str = "", heads_blocked: str = "", **kw: Any
) -> ZooModel:
    """A causal LM from ``{family}Config`` (or ``config``) and ``{family}ForCausalLM``."""
    build = _text(config or f"{family}Config", f"{family}ForCausalLM", **kw)
    return ZooModel(name, build, text=True, attention=True, heads_blocked=heads_blocked)


_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
_HEAD_DIM_16: dict[str, Any] = {**_LLAMA_LIKE, "head_dim": 16}  # families defaulting to 128+
_VIT_LIKE: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
_CONVNEXT_LIKE: dict[str, Any] = {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2}
_SWIN_LIKE: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [1, 1],
    "num_heads": [2, 4],
    "window_size": 4,
}
_BEIT_LIKE: dict[str, Any] = {**_VIT_LIKE, "use_relative_position_bias": True}
_BERT_LIKE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_labels": 3,
}

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        _classifier(
            "resnet",
            "ResNet",
            attention=False,
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="bottleneck",
        ),
        _classifier(
            "mobilenet_v2", "MobileNetV2", attention=False, depth_multiplier=0.25, image_size=32
        ),
        _classifier("convnext", "ConvNext", attention=False, **_CONVNEXT_LIKE),
        # Global response normalisation: each channel divided by the mean over channels.
        _classifier("convnextv2", "ConvNextV2", attention=False, **_CONVNEXT_LIKE),
        _classifier(
            "efficientnet",
            "EfficientNet",
            attention=False,
            image_size=32,
            width_coefficient=0.25,
            depth_coefficient=0.25,
            hidden_dim=320,  # the width of its last convolution at this width_coefficient
        ),
        _classifier("vit", "ViT", attention=True, **_VIT_LIKE),
        _classifier("deit", "DeiT", attention=True, **_VIT_LIKE),
        _classifier("swin", "Swin", attention=True, **_SWIN_LIKE),
        # Cosine attention, a per-head logit scale, a position bias made by an MLP.
        _classifier("swinv2", "Swinv2", attention=True, **_SWIN_LIKE),
        # Relative position bias tables, interpolated before their rows are gathered.
        _classifier("beit", "Beit", attention=True, **_BEIT_LIKE),
        _classifier("data2vec_vision", "Data2VecVision", attention=True, **_BEIT_LIKE),
        _classifier(
            "mobilevit",
            "MobileViT",
            attention=True,
            image_size=32,
            hidden_sizes=[32, 32, 32],
            neck_hidden_sizes=[8, 16, 16, 16, 16, 16, 32],
            num_attention_heads=4,
            expand_ratio=2.0,
        ),
        ZooModel(
            "bert",
            _text("BertConfig", "BertForSequenceClassification", **_BERT_LIKE),
            text=True,
            attention=True,
        ),
        ZooModel(
            "distilbert",
            _text(
                "DistilBertConfig",
                "DistilBertForSequenceClassification",
                dim=32,
                hidden_dim=64,
                n_heads=4,
                n_layers=2,
                num_labels=3,
            ),
            text=True,
            attention=True,
        ),
        ZooModel(
            "roberta",
            _text(
                "RobertaConfig",
                "RobertaForSequenceClassification",
                pad_token_id=1,
                max_position_embeddings=40,
                **_BERT_LIKE,
            ),
            text=True,
            attention=True,
        ),
        ZooModel(
            "gpt2",
            _text("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=32),
            text=True,
            attention=True,
        ),
        _decoder(
            "gpt_neo",
            "GPTNeo",
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            attention="eager",
        ),
        # Fused query_key_value, q, k and v interleaved per head: (B, N, H, 3*D), chunked.
        _decoder(
            "gpt_neox", "GPTNeoX", hidden_size=64, intermediate_size=96, num_attention_heads=4
        ),
        # Rotary embedding on interleaved pairs (stack((-x2, x1), -1)); CodeGen's fused qkv.
        _decoder("gptj", "GPTJ", n_embd=64, n_head=4, rotary_dim=8, n_positions=32),
        _decoder("codegen", "CodeGen", n_embd=64, n_head=4, rotary_dim=8, n_positions=32),
        _decoder("llama", "Llama", **_LLAMA_LIKE),
        _decoder("mistral", "Mistral", sliding_window=None, **_LLAMA_LIKE),
        _decoder("qwen2", "Qwen2", **_LLAMA_LIKE),
        _decoder("qwen3", "Qwen3", **_HEAD_DIM_16),  # RMSNorm over each head's q and k
        _decoder("phi3", "Phi3", pad_token_id=0, **_LLAMA_LIKE),
        _decoder("phi", "Phi", hidden_size=64, intermediate_size=96, num_attention_heads=4),
        _decoder("stablelm", "StableLm", **_LLAMA_LIKE),
        _decoder(
            "olmo2",
            "Olmo2",
            # Its q and k RMSNorms normalise over every head at once: removing heads would
            # change the others' statistics, and RMSNorm's mean is not followed.
            heads_blocked="reduces over the channels",
            **_LLAMA_LIKE,
        ),
        _decoder("gemma", "Gemma", **_HEAD_DIM_16),
        # Gemma-2B's multi-query attention: repeat_kv of one key/value head for every query
        # head. Query heads go on their own; the key/value head stays.
        _decoder("gemma_mqa", "Gemma", **{**_HEAD_DIM_16, "num_key_value_heads": 1}),
        _decoder("gemma2", "Gemma2", attention="eager", sliding_window=4, **_HEAD_DIM_16),
        _decoder(
            "gemma3",
            "Gemma3",
            config="Gemma3TextConfig",
            attention="eager",
            sliding_window=4,
            **_HEAD_DIM_16,
        ),
        _decoder(
            "opt", "OPT", hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32
        ),
        # Falcon's fused query_key_value in three layouts: per key/value group (the new decoder
        # architecture, grouped-query), q, k, v interleaved per head, and multi-query (Falcon-7B:
        # one key and one value head for every query head; query heads go on their own).
        _decoder(
            "falcon",
            "Falcon",
            hidden_size=64,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
        _decoder(
            "falcon_per_head", "Falcon", hidden_size=64, num_attention_heads=4, multi_query=False
        ),
        _decoder("falcon_mqa", "Falcon", hidden_size=64, num_attention_heads=4),
        # Fused query_key_value as (B, N, H, 3, D). Its attention folds the heads into the batch
        # for baddbmm with ALiBi biases computed in the graph for every head: heads stay.
        _decoder(
            "bloom",
            "Bloom",
            attention="eager",
            hidden_size=32,
            n_head=4,
            n_layer=2,
            heads_blocked="folds the heads into the batch dimension",
        ),
    )
}


def export_zoo(model: ZooModel, seed: int = 0) -> torch.export.ExportedProgram:
    """The model wrapped to return ``.logits``, exported with a dynamic batch."""
    torch.manual_seed(seed)
    module = Logits(model.build()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        return torch.export.export(
            module, (model.example(2),), dynamic_shapes=({0: batch},), strict=False
        )
