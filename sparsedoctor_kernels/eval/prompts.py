"""The `sparsedoctor` protocol's prompts (this library's own, not a reference's: see eval/protocols.py for the
references'): CMMLU's Chinese description with the subject's name and dev-split shots, CMB's answer-only
instruction with its exam metadata, and CMExam's question plus options, every prompt ending with "答案：", where
the answer letter comes next. For chat models,
`chat_prompt` wraps a prompt as one user message in the tokenizer's chat template, with the assistant's turn
opened (lm-evaluation-harness's --apply_chat_template): the answer letter comes first in that turn."""

from __future__ import annotations

from sparsedoctor_kernels.eval.items import MCQ
from sparsedoctor_kernels.eval.loaders import CMMLU_MED_SUBJECTS


def _body(item: MCQ) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
    return f"{item.question}\n{options}\n答案："


def cmmlu_prompt(item: MCQ, shots: list[MCQ]) -> str:
    name = CMMLU_MED_SUBJECTS.get(item.subject, item.subject)
    examples = "".join(f"题目：{_body(shot)}{shot.answer}\n\n" for shot in shots)
    return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n{examples}题目：{_body(item)}"


def cmb_prompt(item: MCQ, shots: list[MCQ]) -> str:
    meta = item.meta
    examples = "".join(f"{_body(shot)}{shot.answer}\n\n" for shot in shots)
    kind = meta.get("question_type", "选择题")
    return (f"以下是中国{meta.get('exam_type', '')}中{meta.get('exam_class', '')}考试的一道{kind}，"
            f"不需要做任何分析和解释，直接输出答案选项。\n{examples}{_body(item)}")


def cmexam_prompt(item: MCQ, shots: list[MCQ]) -> str:
    kind = "多项选择题" if item.multi_answer else "单项选择题"
    examples = "".join(f"{_body(shot)}{shot.answer}\n\n" for shot in shots)
    return f"以下是一道医学考试的{kind}，请直接给出正确答案的选项。\n{examples}{_body(item)}"


PROMPTS = {"cmmlu-med": cmmlu_prompt, "cmb": cmb_prompt, "cmexam": cmexam_prompt}


def build_prompt(benchmark: str, item: MCQ, shots: list[MCQ] | None = None) -> str:
    return PROMPTS[benchmark](item, shots or [])


class NoChatTemplateError(ValueError):
    """The tokenizer carries no chat template to render prompts with."""


def chat_prompt(tokenizer, prompt: str, enable_thinking: bool = False) -> str:
    """`prompt` as a single user message, rendered by the tokenizer's chat template up to and including the
    assistant's generation prompt. `enable_thinking` reaches the template (Qwen3's reads it and, when False,
    writes an empty `<think>\n\n</think>` block into the prompt; other templates ignore it)."""
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or "built in memory"
        raise NoChatTemplateError(f"the tokenizer ({type(tokenizer).__name__}, {where}) has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=enable_thinking)
