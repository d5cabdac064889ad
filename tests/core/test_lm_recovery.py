"""Perplexity and fine-tuning of tiny causal LMs on the standard library's source."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from core.errors import DatasetMismatch, InvalidSpec
from core.finetune import Checkpointing
from core.lm_recovery import evaluate_perplexity, fine_tune_lm
from core.spec import FineTuneSpec
from core.text import token_blocks
from tests.core.text_corpus import EOS, corpus, tiny_gpt2, tiny_llama, train_tokenizer

SEQ_LEN = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models on a shared CPU: one thread is 10x faster than two oversubscribed ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(corpus())


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> torch.Tensor:
    path = tmp_path_factory.mktemp("text") / "stdlib.txt"
    path.write_text(corpus())
    eos = tokenizer.token_to_id(EOS)
    assert eos is not None
    return token_blocks(path, tokenizer, SEQ_LEN, eos)


def _split(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return blocks[:-16], blocks[-16:]  # train, held out


@pytest.fixture(scope="module")
def dense(tokenizer: Tokenizer, blocks: torch.Tensor) -> torch.nn.Module:
    """A tiny Llama trained briefly, so pruning hurts it and a teacher has something to say."""
    model = tiny_llama(tokenizer.get_vocab_size(), initializer_range=0.1)
    spec = FineTuneSpec(steps=60, batch_size=8, lr=3e-3, loss="causal_lm", seed=1)
    fine_tune_lm(model, _split(blocks)[0], spec, masked=[], device="cpu")
    return model.eval()


def _prune_half(model: torch.nn.Module) -> list[str]:
    """Zero the smaller half of every row of each decoder linear; returns their weight names."""
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                weight = module.weight
                weight.scatter_(1, weight.abs().argsort(dim=1)[:, : weight.shape[1] // 2], 0.0)
                names.append(f"{name}.weight")
    return names


def _zeros(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach() == 0 for n in names}


@torch.no_grad()
def _reference_nll(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Independent reference: one block at a time, cross-entropy of shifted logits."""
    total, count = 0.0, 0
    for block in blocks:
        logits = model(input_ids=block[None]).logits[0]  # (T, V)
        total += float(F.cross_entropy(logits[:-1], block[1:], reduction="sum"))
        count += block.numel() - 1
    return total / count


@torch.no_grad()
def _kl_to_teacher(
    student: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor
) -> float:
    """Mean KL(teacher || student) per token at temperature 1, computed here from scratch."""
    s = F.log_softmax(student.eval()(input_ids=blocks).logits, dim=-1)
    t = F.log_softmax(teacher.eval()(input_ids=blocks).logits, dim=-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


# --- perplexity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_perplexity_matches_a_plain_loop(build, tokenizer: Tokenizer, blocks: torch.Tensor) -> None:
    model = build(tokenizer.get_vocab_size())
    held = blocks[:7]
    result = evaluate_perplexity(model, held, batch_size=3, device="cpu")
    nll = _reference_nll(model, held)
    assert result["loss"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert (result["num_tokens"], result["seq_len"]) == (7 * (SEQ_LEN - 1), SEQ_LEN)
    # A random model is about as good as a uniform guess over the vocabulary.
    assert 0.5 * tokenizer.get_vocab_size() < result["perplexity"] < 2 * tokenizer.get_vocab_size()


def test_ids_outside_the_vocabulary_are_refused(tokenizer: Tokenizer) -> None:
    model = tiny_llama(tokenizer.get_vocab_size())
    bad = torch.full((2, 8), tokenizer.get_vocab_size())
    with pytest.raises(DatasetMismatch, match="outside the model's vocabulary"):
        evaluate_perplexity(model, bad, device="cpu")
    with pytest.raises(DatasetMismatch, match="at least 2 tokens"):
        evaluate_perplexity(model, torch.zeros(3, 1, dtype=torch.long), device="cpu")


# --- fine-tuning --------------------------------------------------------------------------------


def test_causal_lm_fine_tuning_recovers_a_pruned_model_and_keeps_its_zeros(
    dense: torch.nn.Module, blocks: torch.Tensor
) -> None:
    train, held = _split(blocks)
    model = copy.deepcopy(dense)
    masked = _prune_half(model)
    zeros = _zeros(model, masked)
    dense_ppl = evaluate_perplexity(dense, held, device="cpu")["perplexity"]
    before = evaluate_perplexity(model, held, device="cpu")["perplexity"]
    calls: list[tuple[int, int, dict[str, float] | None]] = []
    spec = FineTuneSpec(steps=30, batch_size=8, lr=3e-3, loss="causal_lm", weight_decay=0.1)
    result = fine_tune_lm(
        model, train, spec, masked=masked, device="cpu", on_step=lambda *a: calls.append(a)
    )
    after = evaluate_perplexity(model, held, device="cpu")["perplexity"]
    print(f"perplexity: dense {dense_ppl:.1f}, pruned {before:.1f}, {after:.1f} after 30 steps")
    assert after < 0.9 * before
    params = dict(model.named_parameters())
    for name, zero in zeros.items():
        assert zero.float().mean() == 0.5
        assert torch.all(params[name][zero] == 0), name
    # Every step reported, the summary at the end of the (only, partial) epoch.
    assert [c[0] for c in calls] == list(range(31))
    assert all(c[1] == 30 for c in calls)
    assert calls[-1][2] is not None
    assert calls[-1][2]["step"] == 30
    assert result.steps == 30
    assert result.history[-1]["loss"] > 0
    assert not model.training  # back in the mode it came in


def test_distillation_gets_closer_to_the_teacher_with_more_steps(
    dense: torch.nn.Module, blocks: torch.Tensor
) -> None:
    train, held = _split(blocks)
    kls = []
    for steps in (0, 4, 16):
        student = copy.deepcopy(dense)
        masked = _prune_half(student)
        if steps:
            spec = FineTuneSpec(
                steps=steps, batch_size=8, lr=1e-3, loss="distillation", temperature=2.0
            )
            result = fine_tune_lm(student, train, spec, masked=masked, teacher=dense, device="cpu")
            assert "teacher_agreement" in result.history[-1]
        kls.append(_kl_to_teacher(student, dense, held))
    print(f"KL to the teacher after 0/4/16 steps of distillation: {kls}")
    assert kls[2] < kls[1] < kls[0]


def test_a_teacher_state_dict_distills_like_the_teacher_module(
    dense: torch.nn.Module, blocks: torch.Tensor
) -> None:
    spec = FineTuneSpec(steps=3, batch_size=4, lr=1e-3, loss="distillation", alpha=0.5)
    students = []
    for teacher in (dense, {k: v.clone() for k, v in dense.state_dict().items()}):
        student = copy.deepcopy(dense)
        masked = _prune_half(student)
        fine_tune_lm(student, blocks[:24], spec, masked=masked, teacher=teacher, device="cpu")
        students.append(student.state_dict())
    for name, tensor in students[0].items():
        assert torch.equal(tensor, students[1][name]), name


class _Stop(Exception):
    pass


def test_a_cancelled_run_resumes_from_its_checkpoint(
    tmp_path: Path, dense: torch.nn.Module, blocks: torch.Tensor
) -> None:
    spec = FineTuneSpec(epochs=2, batch_size=4, lr=1e-3, loss="causal_lm", optimizer="sgd")
    data = blocks[:12]  # 3 steps per epoch, 6 in all

    whole = copy.deepcopy(dense)
    masked = _prune_half(whole)
    fine_tune_lm(whole, data, spec, masked=masked, device="cpu")

    model = copy.deepcopy(dense)
    _prune_half(model)
    checkpoint = Checkpointing(tmp_path / "ft.pt", every_steps=2)

    def stop_at_5(step: int, total: int, summary: dict[str, float] | None) -> None:
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        fine_tune_lm(
            model, data, spec, masked=masked, device="cpu", checkpoint=checkpoint, on_step=stop_at_5
        )
    resumed = copy.deepcopy(dense)
    _prune_half(resumed)
    result = fine_tune_lm(resumed, data, spec, masked=masked, device="cpu", checkpoint=checkpoint)
    assert result.resumed_from_step == 4
    assert len(result.history) == 2
    for name, tensor in whole.state_dict().items():
        assert torch.allclose(tensor, resumed.state_dict()[name], atol=1e-6), name


def test_a_bf16_model_trains_in_fp32_and_comes_back_in_bf16(
    dense: torch.nn.Module, blocks: torch.Tensor
) -> None:
    model = copy.deepcopy(dense).to(torch.bfloat16)
    masked = _prune_half(model)
    zeros = _zeros(model, masked)
    spec = FineTuneSpec(steps=2, batch_size=4, lr=1e-3, loss="causal_lm")
    fine_tune_lm(model, blocks[:8], spec, masked={n: ~z for n, z in zeros.items()}, device="cpu")
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    for name, zero in zeros.items():
        assert torch.all(params[name][zero] == 0), name


def test_specs_that_do_not_fit_a_language_model_are_refused(
    dense: torch.nn.Module, blocks: torch.Tensor
) -> None:
    model = copy.deepcopy(dense)
    with pytest.raises(InvalidSpec, match="causal_lm"):
        fine_tune_lm(model, blocks, FineTuneSpec(steps=1, loss="cross_entropy"), masked=[])
    with pytest.raises(InvalidSpec, match="teacher"):
        fine_tune_lm(model, blocks, FineTuneSpec(steps=1, loss="distillation"), masked=[])
    with pytest.raises(InvalidSpec, match="not a parameter"):
        fine_tune_lm(
            model,
            blocks,
            FineTuneSpec(steps=1, loss="causal_lm"),
            masked=["nope.weight"],
            device="cpu",
        )
