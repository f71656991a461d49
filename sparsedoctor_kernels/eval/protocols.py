"""Named evaluation protocols: the prompt, the few-shot format and the scoring of a reference, reproduced so that a
score can be compared with the published numbers of that reference (docs/evaluation.md has the table).

- `lm-eval` (CMMLU-Med): lm-evaluation-harness's `cmmlu_<subject>` tasks (lm_eval/tasks/cmmlu/
  _default_template_yaml and _generate_configs.py, unchanged from v0.4.4 to v0.4.13): the subject's
  description, `Question.strip()` and the options as written, "答案：", shots the first n dev rows followed by
  " A" and "\\n\\n"; each option scored as the summed log-likelihood of the continuation " A" (" B", ...) after
  the context, tokenised as its `_encode_pair` does; `acc` and `acc_norm` (equal here: every choice is one
  character).
- `cmmlu` (CMMLU-Med): the official CMMLU script (haonan-li/CMMLU, src/mp_utils.py and hf_causal_model.py):
  "题目：" and the question as written, "答案是："; shots "答案是：A\\n\\n"; the prediction is the option whose
  letter token ("A", no space) has the largest logit after the prompt.
- `cmb` (CMB-Exam): the official answer-only prompt (FreedomIntelligence/CMB, workers/base.py), options of one
  character left out as that code does; greedy generation, the answer read by its `match_choice`
  (src/utils.py: the letters after "答案是"/"正确选项为"..., else every capital A-G of the reply), a single-
  answer question keeping the first letter, scored by exact string match (no partial credit).
- `cmexam` (CMExam): the authors' prompt 1 ("问题: {question}, \\n 选项: {options}", src/preprocess/
  prompt_templates.py) in their inference template ("{instruction}\\n### 回答:\\n", src/LoRA/templates/
  med_template.json); greedy generation; an option is predicted when its letter or its text appears in the
  reply's first line (src/evaluation/evaluate_lora_result.py), exact match.
- `sparsedoctor` (every benchmark): the library's own prompts for chat models and thinking: a question and its
  options ending in "答案：", scored by the next-token letter log-probabilities or, for multi-answer questions,
  `--mode generate` and `--chat-template` (with `--enable-thinking`), by generation and letter extraction.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from sparsedoctor_kernels.eval.items import MCQ
from sparsedoctor_kernels.eval.loaders import CMMLU_MED_SUBJECTS
from sparsedoctor_kernels.eval.prompts import build_prompt


@dataclass(frozen=True)
class Protocol:
    name: str
    benchmarks: tuple[str, ...]
    scoring: str  # "loglikelihood" (of each option's continuation), "next-token" (letter logits) or "generate"
    prompt: Callable[[MCQ, list[MCQ]], str]
    source: str
    continuation: Callable[[str], str] = str  # loglikelihood: the text scored after the prompt, per letter
    extract: Callable[[str, MCQ], str] | None = None  # generate: the reply -> the predicted letters

    def applies_to(self, benchmark: str) -> bool:
        return "*" in self.benchmarks or benchmark in self.benchmarks


def _raw(item: MCQ, column: str) -> str:
    """A field as the benchmark's file holds it (the loaders strip their own copies)."""
    return item.meta.get("raw", {}).get(column, item.options.get(column, item.question if column == "Question" else ""))


def _cmmlu_description(item: MCQ) -> str:
    return f"以下是关于{CMMLU_MED_SUBJECTS.get(item.subject, item.subject)}的单项选择题，请直接给出正确答案的选项。\n\n"


def _options(item: MCQ) -> str:
    return "".join(f"\n{letter}. {_raw(item, letter)}" for letter in "ABCD")


def _cmmlu_context(item: MCQ, shots: list[MCQ], text: Callable[[MCQ], str], before_answer: str) -> str:
    """The subject's description, each shot's text with its answer and a blank line, then the item's text."""
    examples = "".join(f"{text(shot)}{before_answer}{shot.answer}\n\n" for shot in shots)
    return _cmmlu_description(item) + examples + text(item)


def lm_eval_prompt(item: MCQ, shots: list[MCQ]) -> str:
    """lm-evaluation-harness's context: description, each shot's doc_to_text + target_delimiter " " + its letter
    + fewshot_delimiter "\n\n", then the item's doc_to_text."""
    return _cmmlu_context(item, shots, lambda i: f"{_raw(i, 'Question').strip()}{_options(i)}\n答案：", " ")


def cmmlu_prompt(item: MCQ, shots: list[MCQ]) -> str:
    """The official CMMLU script's `gen_prompt` (tokenizer=None): description, shots, the item."""
    return _cmmlu_context(item, shots, lambda i: f"题目：{_raw(i, 'Question')}{_options(i)}\n答案是：", "")


def cmb_prompt(item: MCQ, shots: list[MCQ]) -> str:
    """CMB's answer-only question template; options whose text is one character are left out, as its code does."""
    meta = item.meta
    options = "\n".join(f"{letter}. {text}" for letter, text in _raw_options(item).items() if len(text) > 1)
    return (f"以下是中国{meta.get('exam_type', '')}中{meta.get('exam_class', '')}考试的一道"
            f"{meta.get('question_type', '')}，不需要做任何分析和解释，直接输出答案选项。\n"
            f"{_raw(item, 'Question')}\n{options}")


def _raw_options(item: MCQ) -> dict[str, str]:
    return item.meta.get("raw_options") or item.options


_CMB_ANSWER = re.compile(r"(答案|正确选项)(?:是|：|为|应该是|应该为)(.*?)(。|\.|$)", re.S)


def cmb_extract(reply: str, item: MCQ) -> str:
    """CMB's `match_choice`, then a single-answer question keeps the first letter (src/utils.py)."""
    letters = "ABCDEFG"
    found = _CMB_ANSWER.search(reply)
    text = found.group(2) if found else reply
    choice = "".join(ch for ch in text if ch in letters)
    return choice[:1] if len(choice) > 1 and not item.multi_answer else choice


def cmexam_prompt(item: MCQ, shots: list[MCQ]) -> str:
    options = item.meta.get("raw", {}).get("Options") or "\n".join(f"{k} {v}" for k, v in item.options.items())
    return f"问题: {_raw(item, 'Question')}, \n 选项: {options}\n### 回答:\n"


def cmexam_extract(reply: str, item: MCQ) -> str:
    """CMExam's `parse_options`: the reply's first line when it explains itself; every option whose letter or
    text appears in it, in option order ("" when none: the authors' "无答案", counted wrong)."""
    text = reply.strip()
    if "解释" in text:
        text = text.split("\n")[0]
    return "".join(letter for letter, body in item.options.items() if letter in text or (body and body in text))


PROTOCOLS = {protocol.name: protocol for protocol in (
    Protocol("lm-eval", ("cmmlu-med",), "loglikelihood", lm_eval_prompt,
             "lm-evaluation-harness cmmlu_<subject> (v0.4.4-v0.4.13)", continuation=lambda letter: f" {letter}"),
    Protocol("cmmlu", ("cmmlu-med",), "next-token", cmmlu_prompt, "official CMMLU script (haonan-li/CMMLU)"),
    Protocol("cmb", ("cmb",), "generate", cmb_prompt, "official CMB answer-only prompt and match_choice",
             extract=cmb_extract),
    Protocol("cmexam", ("cmexam",), "generate", cmexam_prompt, "CMExam authors' prompt 1 and parse_options",
             extract=cmexam_extract),
    Protocol("sparsedoctor", ("*",), "next-token", lambda item, shots: "", "this library's chat/thinking prompts"),
)}
DEFAULT_PROTOCOL = {"cmmlu-med": "lm-eval", "cmb": "cmb", "cmexam": "cmexam"}


def get_protocol(name: str, benchmark: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if not protocol.applies_to(benchmark):
        raise ValueError(f"protocol {name!r} is {', '.join(protocol.benchmarks)}'s, not {benchmark}'s")
    if name == "sparsedoctor":  # its prompts depend on the benchmark
        return Protocol(name, protocol.benchmarks, protocol.scoring,
                        lambda item, shots: build_prompt(benchmark, item, shots), protocol.source)
    return protocol
