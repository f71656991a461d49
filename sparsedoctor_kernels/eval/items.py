"""The multiple-choice item every benchmark loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field


class EvalDataError(ValueError):
    """Benchmark data that cannot be read, named by file and line or row."""


@dataclass(frozen=True)
class MCQ:
    id: str
    question: str
    options: dict[str, str]  # ordered letter -> text
    answer: str  # the correct letters, sorted ("" when unknown)
    subject: str
    meta: dict = field(default_factory=dict)

    @property
    def multi_answer(self) -> bool:
        return len(self.answer) > 1 or "多" in self.meta.get("question_type", "")

