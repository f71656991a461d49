"""Evaluation on CMB, CMExam and CMMLU-Med: loaders, prompts, a runner, answer extraction and scoring."""

from sparsedoctor_kernels.eval.answers import extract_answer, normalize_letters
from sparsedoctor_kernels.eval.items import MCQ, EvalDataError
from sparsedoctor_kernels.eval.loaders import CMMLU_MED_SUBJECTS, load_benchmark, load_cmb_answers, load_cmb_key_items
from sparsedoctor_kernels.eval.prompts import build_prompt
from sparsedoctor_kernels.eval.runner import evaluate
from sparsedoctor_kernels.eval.scoring import score

extract_letters = extract_answer  # the earlier name; one extractor for generated text and prediction files

__all__ = ["CMMLU_MED_SUBJECTS", "MCQ", "EvalDataError", "build_prompt", "evaluate", "extract_answer",
           "extract_letters", "load_benchmark", "load_cmb_answers", "load_cmb_key_items", "normalize_letters",
           "score"]
