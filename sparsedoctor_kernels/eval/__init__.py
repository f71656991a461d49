"""Evaluation on CMB, CMExam and CMMLU-Med: loaders, prompts, a runner and scoring."""

from sparsedoctor_kernels.eval.items import MCQ, EvalDataError
from sparsedoctor_kernels.eval.loaders import CMMLU_MED_SUBJECTS, load_benchmark, load_cmb_answers, load_cmb_key_items
from sparsedoctor_kernels.eval.prompts import build_prompt
from sparsedoctor_kernels.eval.runner import evaluate, extract_letters
from sparsedoctor_kernels.eval.scoring import score

__all__ = ["CMMLU_MED_SUBJECTS", "MCQ", "EvalDataError", "build_prompt", "evaluate", "extract_letters",
           "load_benchmark", "load_cmb_answers", "load_cmb_key_items", "score"]
