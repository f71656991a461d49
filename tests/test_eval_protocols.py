"""Named evaluation protocols against their references: lm-evaluation-harness itself (same contexts, same
predictions on real CMMLU-Med items, zero- and five-shot), the official CMMLU script's and lm-eval's prompt
templates written out from their sources, CMB's and CMExam's official prompts and answer reading on fixtures in
their layouts, lm-eval samples files scored, and what every report records."""

import csv
import json

import pytest
import torch

from sparsedoctor_kernels import cli
from sparsedoctor_kernels.eval.harness import run_lm_eval, sample_prediction, write_cmmlu_tasks
from sparsedoctor_kernels.eval.loaders import load_benchmark, load_cmmlu
from sparsedoctor_kernels.eval.protocols import PROTOCOLS, get_protocol
from sparsedoctor_kernels.eval.runner import evaluate
from sparsedoctor_kernels.eval.scoring import score

from conftest import SHARED

CMMLU = SHARED / "data" / "cmmlu-med"
QWEN2 = SHARED / "tokenizers" / "qwen2"
needs_cmmlu = pytest.mark.skipif(not CMMLU.is_dir(), reason="../shared/data/cmmlu-med not present")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def first_shots(subject, count):
    return load_cmmlu(CMMLU, split="dev", subjects=[subject])[:count]


@needs_cmmlu
def test_lm_eval_and_official_cmmlu_prompts_are_their_templates():
    """The templates as their sources write them: lm-eval's _default_template_yaml (doc_to_text
    "{{Question.strip()}}\\nA. {{A}}...\\n答案：", description per subject, target_delimiter " ", fewshot_delimiter
    "\\n\\n") and the official CMMLU src/mp_utils.py (format_example: "题目：" + question, "\\n{letter}. {option}",
    "\\n答案是：" + answer + "\\n\\n"; gen_prompt's description)."""
    item = load_cmmlu(CMMLU, subjects=["clinical_knowledge"])[0]
    with (CMMLU / "test" / "clinical_knowledge.csv").open(encoding="utf-8", newline="") as handle:
        row = next(csv.DictReader(handle))
    shots = first_shots("clinical_knowledge", 2)
    with (CMMLU / "dev" / "clinical_knowledge.csv").open(encoding="utf-8", newline="") as handle:
        dev = list(csv.DictReader(handle))[:2]
    description = "以下是关于临床知识的单项选择题，请直接给出正确答案的选项。\n\n"

    def lm_eval_text(r):
        return f"{r['Question'].strip()}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案："

    def official_text(r):
        return f"题目：{r['Question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案是："

    lm_eval, official = get_protocol("lm-eval", "cmmlu-med"), get_protocol("cmmlu", "cmmlu-med")
    assert lm_eval.prompt(item, []) == description + lm_eval_text(row)
    assert lm_eval.prompt(item, shots) == description + "".join(
        f"{lm_eval_text(r)} {r['Answer']}\n\n" for r in dev) + lm_eval_text(row)
    assert [lm_eval.continuation(letter) for letter in "AB"] == [" A", " B"]
    assert official.prompt(item, []) == description + official_text(row)
    assert official.prompt(item, shots) == description + "".join(
        f"{official_text(r)}{r['Answer']}\n\n" for r in dev) + official_text(row)
    assert row["D"] == "1500mL" and official.prompt(item, []).endswith("\nD. 1500mL\n答案是：")


@needs_cmmlu
@pytest.mark.skipif(not QWEN2.is_dir(), reason="../shared/tokenizers/qwen2 not present")
@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 5])
def test_lm_eval_protocol_agrees_with_lm_evaluation_harness_item_for_item(shots, tmp_path):
    """lm-evaluation-harness (lm_eval.simple_evaluate, its HFLM, the task files the library writes) and
    `--protocol lm-eval` on a tiny Qwen3 with the real Qwen2 vocabulary: the same context string for every
    item, the same continuations, the same log-likelihoods and the same pick."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    tokenizer = AutoTokenizer.from_pretrained(QWEN2)
    model = tiny_qwen3(vocab_size=len(tokenizer), seed=3).eval()
    subjects = ["anatomy", "traditional_chinese_medicine"]
    tasks = write_cmmlu_tasks(CMMLU, tmp_path / "tasks", subjects)
    results = run_lm_eval(model, tokenizer, tasks, tmp_path / "tasks", num_fewshot=shots, limit=6)
    items = {item.id: item for item in load_cmmlu(CMMLU, subjects=subjects)}
    protocol = get_protocol("lm-eval", "cmmlu-med")
    checked = []
    for task, subject in zip(tasks, subjects):
        for sample in results["samples"][task]:
            item = items[f"{subject}/{sample['doc_id']}"]
            contexts = {argument[0] for argument in sample["arguments"]}
            assert contexts == {protocol.prompt(item, first_shots(subject, shots))}, item.id
            assert [argument[1] for argument in sample["arguments"]] == [" A", " B", " C", " D"]
            checked.append((item, sample))
    assert len(checked) == 12
    shot_lists = {subject: first_shots(subject, shots) for subject in subjects}
    records = {r["id"]: r for r in evaluate(model, tokenizer, "cmmlu-med", [item for item, _ in checked],
                                             shots=shot_lists, protocol="lm-eval", progress=False)}
    for item, sample in checked:
        ours = records[item.id]
        assert ours["prediction"] == sample_prediction(sample), item.id
        theirs = [float(response[0]) for response in sample["filtered_resps"]]
        torch.testing.assert_close(torch.tensor(list(ours["log_probs"].values())), torch.tensor(theirs),
                                   rtol=0, atol=1e-4)


def write_cmb(tmp_path):
    questions = [
        {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "内科",
         "question": "缺铁性贫血的首选检查是 ", "question_type": "单项选择题",
         "option": {"A": "血清铁蛋白", "B": "骨髓穿刺", "C": "是", "D": "心电图"}, "id": 1},
        {"exam_type": "护理考试", "exam_class": "护士执业资格", "exam_subject": "护理", "question": "属于生命体征的是",
         "question_type": "多项选择题", "option": {"A": "体温", "B": "脉搏", "C": "血型", "D": "呼吸"}, "id": 2,
         "answer": "ABD"},
    ]
    questions[0]["answer"] = "A"
    (tmp_path / "cmb.json").write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
    return load_benchmark("cmb", tmp_path / "cmb.json")


def test_cmb_protocol_is_the_official_answer_only_prompt_and_reading(tmp_path):
    """FreedomIntelligence/CMB workers/base.py's question template (single-character options left out, as
    its `len(v) > 1` does) and src/utils.py's match_choice, a single-answer question keeping its first letter;
    the official exact match (letters in the order written)."""
    single, multi = write_cmb(tmp_path)
    protocol = get_protocol("cmb", "cmb")
    assert protocol.prompt(single, []) == ("以下是中国医师考试中执业医师考试的一道单项选择题，不需要做任何分析和解释，"
                                           "直接输出答案选项。\n缺铁性贫血的首选检查是 \nA. 血清铁蛋白\nB. 骨髓穿刺\n"
                                           "D. 心电图")
    read = protocol.extract
    assert read("答案是B。因为DNA", single) == "B"  # the cue's span ends at the full stop
    assert read("我选 C 和 A", single) == "C"  # no cue: every capital A-G, the first kept for a single answer
    assert read("正确选项为ABD", multi) == "ABD" and read("答案：DBA", multi) == "DBA"
    result = score("cmb", [single, multi], {"1": read("答案是A", single), "2": read("答案：DBA", multi)}, exact=True)
    assert result["correct"] == 1  # "DBA" is not the official "ABD": exact string match
    assert score("cmb", [single, multi], {"1": "A", "2": "DBA"})["correct"] == 2  # the library's own: letter sets


def test_cmexam_protocol_is_the_authors_prompt_and_parse(tmp_path):
    path = tmp_path / "cmexam.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Question", "Options", "Answer", "Explanation", "Clinical Department"])
        writer.writerow(["急性阑尾炎的典型表现是", "A 转移性右下腹痛\nB 左上腹痛\nC 胸痛", "A", "", "外科"])
    (item,) = load_benchmark("cmexam", path)
    protocol = get_protocol("cmexam", "cmexam")
    assert protocol.prompt(item, []) == ("问题: 急性阑尾炎的典型表现是, \n 选项: A 转移性右下腹痛\nB 左上腹痛\nC 胸痛"
                                         "\n### 回答:\n")
    assert protocol.extract("答案: A\n解释: 麦氏点", item) == "A"
    assert protocol.extract("应为转移性右下腹痛", item) == "A"  # the option's text counts as its letter
    assert protocol.extract("不知道", item) == ""  # the authors' "无答案": wrong


@needs_cmmlu
def test_lm_eval_samples_files_are_scored(tmp_path, capsys):
    items = load_cmmlu(CMMLU, subjects=["virology"])[:2]
    samples = [{"doc_id": 0, "doc": {}, "target": "0", "arguments": [], "resps": [],
                "filtered_resps": [["-3.5", "False"], ["-1.0", "True"], ["-2.0", "False"], ["-9.0", "False"]]},
               {"doc_id": 1, "doc": {}, "target": "0", "arguments": [], "resps": [],
                "filtered_resps": [[-1.0, True], [-4.0, False], [-2.0, False], [-5.0, False]]}]
    path = tmp_path / "samples_cmmlu_virology_2026-12-07T21-15-52.142939.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples), encoding="utf-8")
    assert cli.main(["eval", "--benchmark", "cmmlu-med", "--data", str(CMMLU), "--subjects", "virology", "--limit",
                     "2", "--score", "--predictions", str(path)]) == 0
    expected = sum(item.answer == letter for item, letter in zip(items, "BA"))
    assert f"({expected}/2)" in capsys.readouterr().out
    bad = tmp_path / "samples.jsonl"
    bad.write_text(json.dumps(samples[0]) + "\n", encoding="utf-8")
    assert cli.main(["eval", "--benchmark", "cmmlu-med", "--data", str(CMMLU), "--score", "--predictions",
                     str(bad)]) == 2
    assert "does not say its task" in capsys.readouterr().err


@needs_cmmlu
@pytest.mark.parametrize("protocol", ["lm-eval", "cmmlu", "sparsedoctor"])
def test_every_report_names_its_protocol_shots_dtype_and_model(protocol, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["eval", "--benchmark", "cmmlu-med", "--data", str(CMMLU), "--subjects", "genetics", "--limit",
                     "2", "--shots", "1", "--protocol", protocol, "--dtype", "float32", "--output-dir", str(out),
                     "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["protocol"], report["shots"], report["dtype"], report["model"]) == (protocol, 1, "float32", "tiny")
    assert report["protocol_source"] == PROTOCOLS[protocol].source
    assert f"protocol {protocol}" in (out / "report.md").read_text()
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(set(r["log_probs"]) == set("ABCD") and r["prediction"] in "ABCD" and r["protocol"] == protocol
               for r in records)
    assert ("acc_norm" in report) == (protocol == "lm-eval")


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "lm-eval", "--chat-template"], "belong to --protocol sparsedoctor"),
    (["--protocol", "cmb"], "is for cmb, not cmmlu-med"),
    (["--harness", "lm-eval", "--protocol", "cmmlu"], "runs lm-eval's own protocol"),
    (["--harness", "lm-eval", "--split", "dev"], "evaluates the test split"),
])
def test_protocol_flag_errors_are_one_line(flags, message, tmp_path, capsys):
    benchmark = [] if "--benchmark" in flags else ["--benchmark", "cmmlu-med"]
    code = cli.main(["eval", *benchmark, *flags, "--data", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:score:UserWarning")  # a random tiny model may write no letter at all
@pytest.mark.parametrize("name", ["cmb", "cmexam"])  # not `benchmark`: pytest-benchmark's fixture
def test_cmb_and_cmexam_under_lm_evaluation_harness_agree_with_their_protocols(name, tmp_path):
    """`--harness lm-eval` runs the official protocol as an lm-eval generate_until task (the task files it
    writes): lm-eval's prompts, replies and picks are the `--protocol cmb` / `cmexam` run's, item for item."""
    pytest.importorskip("lm_eval")
    if name == "cmb":
        write_cmb(tmp_path)
        data = ["--data", str(tmp_path / "cmb.json")]
    else:
        with (tmp_path / "cmexam.csv").open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Question", "Options", "Answer", "Clinical Department"])
            writer.writerow(["急性阑尾炎的典型表现是", "A 转移性右下腹痛\nB 左上腹痛\nC 胸痛", "A", "外科"])
            writer.writerow(["糖尿病的典型症状包括", "A 多饮\nB 多尿\nC 体重增加", "AB", "内科"])
        data = ["--data", str(tmp_path / "cmexam.csv")]
    runs = {}
    for run, extra in (("ours", []), ("harness", ["--harness", "lm-eval"])):
        out = tmp_path / run
        assert cli.main(["eval", "--benchmark", name, *data, "--output-dir", str(out), "--no-progress",
                         *extra]) == 0
        runs[run] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert json.loads((out / "report.json").read_text())["protocol"] == name
    assert [(r["id"], r["output"], r["prediction"]) for r in runs["ours"]] == [
        (r["id"], r["output"], r["prediction"]) for r in runs["harness"]]
    samples_file = tmp_path / "harness" / "lm-eval" / f"samples_sparsedoctor_{name}.jsonl"
    # Its samples file scored again reads the replies as the run did (the official reading, exact match).
    assert cli.main(["eval", "--benchmark", name, *data, "--score", "--predictions", str(samples_file),
                     "--output-dir", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "report.json").read_text())
    assert rescored["correct"] == json.loads((tmp_path / "harness" / "report.json").read_text())["correct"]
    samples = samples_file.read_text().splitlines()
    items = load_benchmark(name, data[1])
    protocol = get_protocol(name, name)
    assert [json.loads(line)["arguments"][0][0] for line in samples] == [protocol.prompt(i, []) for i in items]


@needs_cmmlu
@pytest.mark.slow
def test_harness_runs_a_base_with_its_adapter(tmp_path):
    """lm-eval's HFLM takes the SparseDoctorModel (base + adapter) as it is: its picks are `--protocol lm-eval`'s."""
    pytest.importorskip("lm_eval")
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3
    from sparsedoctor_kernels.train.loading import load_tokenizer

    model = apply_sparsedoctor(tiny_qwen3(vocab_size=len(load_tokenizer("tiny")), seed=0),
                               SparseDoctorConfig(num_experts=4, r=4))
    with torch.no_grad():
        for layer in model.adapted_modules().values():
            layer.lora_b.normal_()  # an adapter that changes the outputs
    model.save_pretrained(tmp_path / "adapter")
    runs = {}
    for run, extra in (("ours", []), ("harness", ["--harness", "lm-eval"])):
        assert cli.main(["eval", "--benchmark", "cmmlu-med", "--data", str(CMMLU), "--subjects", "nutrition",
                         "--limit", "3", "--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / run),
                         "--no-progress", *extra]) == 0
        runs[run] = [json.loads(line) for line in (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in runs["ours"]] == [r["prediction"] for r in runs["harness"]]
    for ours, theirs in zip(runs["ours"], runs["harness"]):
        torch.testing.assert_close(torch.tensor(list(ours["log_probs"].values())),
                                   torch.tensor(list(theirs["log_probs"].values())), rtol=0, atol=1e-4)
