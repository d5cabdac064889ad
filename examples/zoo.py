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
    """A transformers architecture at test size; ``attention`` when it has heads to prune."""

    name: str
    build: Callable[[], nn.Module]
    text: bool
    attention: bool

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


_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
_VIT_LIKE: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
_BERT_LIKE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_labels": 3,
}

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "resnet",
            _vision(
                "ResNetConfig",
                "ResNetForImageClassification",
                embedding_size=16,
                hidden_sizes=[16, 32],
                depths=[1, 1],
                layer_type="bottleneck",
            ),
            text=False,
            attention=False,
        ),
        ZooModel(
            "mobilenet_v2",
            _vision(
                "MobileNetV2Config",
                "MobileNetV2ForImageClassification",
                depth_multiplier=0.25,
                image_size=32,
            ),
            text=False,
            attention=False,
        ),
        ZooModel(
            "convnext",
            _vision(
                "ConvNextConfig",
                "ConvNextForImageClassification",
                hidden_sizes=[16, 32],
                depths=[1, 1],
                num_stages=2,
            ),
            text=False,
            attention=False,
        ),
        ZooModel(
            "vit",
            _vision("ViTConfig", "ViTForImageClassification", **_VIT_LIKE),
            text=False,
            attention=True,
        ),
        ZooModel(
            "deit",
            _vision("DeiTConfig", "DeiTForImageClassification", **_VIT_LIKE),
            text=False,
            attention=True,
        ),
        ZooModel(
            "swin",
            _vision(
                "SwinConfig",
                "SwinForImageClassification",
                image_size=32,
                patch_size=4,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[2, 4],
                window_size=4,
            ),
            text=False,
            attention=True,
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
        ZooModel(
            "gpt_neo",
            _text(
                "GPTNeoConfig",
                "GPTNeoForCausalLM",
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                attention_types=[[["global", "local"], 1]],
                window_size=4,
                attention="eager",
            ),
            text=True,
            attention=True,
        ),
        ZooModel(
            "llama",
            _text("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE),
            text=True,
            attention=True,
        ),
        ZooModel(
            "mistral",
            _text("MistralConfig", "MistralForCausalLM", sliding_window=None, **_LLAMA_LIKE),
            text=True,
            attention=True,
        ),
        ZooModel(
            "qwen2",
            _text("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE),
            text=True,
            attention=True,
        ),
        ZooModel(
            "phi3",
            _text("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_LLAMA_LIKE),
            text=True,
            attention=True,
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
