"""Benchmark loaders, scoring (real CMMLU-Med data and the real CMB key when ../shared is present), prompts,
the runner on a tiny model, and the eval command."""

import csv
import json

import pytest

from sparsedoctor_kernels import cli
from sparsedoctor_kernels.eval import (
    MCQ,
    EvalDataError,
    build_prompt,
    extract_letters,
    load_benchmark,
    load_cmb_key_items,
    score,
)

from conftest import SHARED

CMMLU = SHARED / "data" / "cmmlu-med"
CMB_KEY = SHARED / "data" / "cmb" / "CMB-test-choice-answer.json"
needs_cmmlu = pytest.mark.skipif(not CMMLU.is_dir(), reason="../shared/data/cmmlu-med not present")
needs_cmb_key = pytest.mark.skipif(not CMB_KEY.is_file(), reason="../shared/data/cmb not present")

CMMLU_TEST_COUNTS = {"anatomy": 148, "clinical_knowledge": 237, "college_medicine": 273, "genetics": 176,
                     "nutrition": 145, "traditional_chinese_medicine": 185, "virology": 169}


@needs_cmmlu
def test_cmmlu_med_counts_oracle_and_constant_predictor():
    items = load_benchmark("cmmlu-med", CMMLU)
    assert len(items) == 1333
    counts = {s: sum(i.subject == s for i in items) for s in CMMLU_TEST_COUNTS}
    assert counts == CMMLU_TEST_COUNTS
    assert items[0].id == "anatomy/0" and items[0].options["A"] == "卵巢" and items[0].answer == "A"
    assert score("cmmlu-med", items, {i.id: i.answer for i in items})["accuracy"] == 1.0
    result = score("cmmlu-med", items, {i.id: "b" for i in items})
    assert result["accuracy"] == pytest.approx(sum(i.answer == "B" for i in items) / 1333)
    for subject, accuracy in result["by_group"].items():
        mine = [i for i in items if i.subject == subject]
        assert accuracy == pytest.approx(sum(i.answer == "B" for i in mine) / len(mine))
    dev = load_benchmark("cmmlu-med", CMMLU, split="dev", subjects=["virology"])
    assert len(dev) == 5 and {i.subject for i in dev} == {"virology"}


@needs_cmmlu
def test_cmmlu_prompt_is_the_chinese_template_with_shots():
    item = load_benchmark("cmmlu-med", CMMLU, subjects=["anatomy"])[0]
    shots = load_benchmark("cmmlu-med", CMMLU, split="dev", subjects=["anatomy"])[:2]
    prompt = build_prompt("cmmlu-med", item, shots)
    assert prompt.startswith("以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n题目：")
    assert prompt.count("题目：") == 3 and prompt.endswith("D. 乳腺\n答案：")
    assert f"答案：{shots[0].answer}\n\n" in prompt


@needs_cmb_key
def test_cmb_scoring_against_the_official_key():
    items = load_cmb_key_items(CMB_KEY)
    assert len(items) == 11200
    # Right on every physician-exam item (2,000 of them), wrong elsewhere.
    predictions = {i.id: (i.answer.lower()[::-1] if i.meta["exam_type"] == "医师考试" else "Z") for i in items}
    result = score("cmb", items, predictions)
    assert result["n"] == 11200 and result["correct"] == 2000
    assert result["accuracy"] == pytest.approx(2000 / 11200)
    assert result["by_group"]["医师考试"]["accuracy"] == 1.0
    assert all(g["accuracy"] == 0.0 for t, g in result["by_group"].items() if t != "医师考试")
    assert len(result["by_group"]) == 6 and result["macro_accuracy"] == pytest.approx(1 / 6)
    # Per exam_class, then macro per exam_type: half the classes of one type right gives that type 0.5.
    pharmacist = sorted({i.meta["exam_class"] for i in items if i.meta["exam_type"] == "药师考试"})
    right_classes = set(pharmacist[: len(pharmacist) // 2])
    predictions = {i.id: i.answer if i.meta["exam_class"] in right_classes and i.meta["exam_type"] == "药师考试"
                   else "" for i in items}
    assert score("cmb", items, predictions)["by_group"]["药师考试"]["accuracy"] == pytest.approx(
        len(right_classes) / len(pharmacist))


def write_cmb_fixture(tmp_path):
    questions = [
        {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "内科",
         "question": "缺铁性贫血的首选检查是", "answer": "", "question_type": "单项选择题",
         "option": {"A": "血清铁蛋白", "B": "骨髓穿刺", "C": "胃镜", "D": "心电图", "E": ""}, "id": 1},
        {"exam_type": "护理考试", "exam_class": "护士执业资格", "exam_subject": "护理", "question": "属于生命体征的是",
         "answer": "", "question_type": "多项选择题",
         "option": {"A": "体温", "B": "脉搏", "C": "血型", "D": "呼吸"}, "id": 2},
    ]
    key = [{"id": 1, "exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "内科",
            "question_type": "单项选择题", "answer": "A"},
           {"id": 2, "exam_type": "护理考试", "exam_class": "护士执业资格", "exam_subject": "护理",
            "question_type": "多项选择题", "answer": "DBA"}]
    (tmp_path / "cmb.json").write_text(json.dumps(questions, ensure_ascii=False))
    (tmp_path / "key.json").write_text(json.dumps(key, ensure_ascii=False))
    return tmp_path / "cmb.json", tmp_path / "key.json"


def test_cmb_loader_on_its_schema(tmp_path):
    questions, key = write_cmb_fixture(tmp_path)
    items = load_benchmark("cmb", questions, answers=key)
    assert [i.answer for i in items] == ["A", "ABD"]
    assert list(items[0].options) == ["A", "B", "C", "D"]  # the empty E is not an option
    assert items[1].multi_answer and items[1].meta["exam_class"] == "护士执业资格"
    prompt = build_prompt("cmb", items[1])
    assert prompt.startswith("以下是中国护理考试中护士执业资格考试的一道多项选择题，"
                             "不需要做任何分析和解释，直接输出答案选项。")
    assert load_benchmark("cmb", questions)[0].answer == ""  # no key: unknown answers
    bad = json.loads(questions.read_text())
    bad[1]["option"] = {"A": "x"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(EvalDataError, match=r"bad.json: entry 1 \(id 2\): answer letter\(s\) \['B', 'D'\]"):
        load_benchmark("cmb", tmp_path / "bad.json", answers=key)
    (tmp_path / "broken.json").write_text('[{"id": 1,\n "question": }]')
    with pytest.raises(EvalDataError, match=r"broken.json: malformed JSON at line 2"):
        load_benchmark("cmb", tmp_path / "broken.json")


CMEXAM_COLUMNS = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Clinical Department",
                  "Medical Discipline", "Competency", "Difficulty level"]


def write_cmexam_fixture(path, rows):
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CMEXAM_COLUMNS)
        writer.writerows(rows)


def test_cmexam_loader_on_its_schema(tmp_path):
    rows = [
        ["急性阑尾炎的典型表现是", "A 转移性右下腹痛\nB 左上腹痛\nC 胸痛\nD 头痛\nE 腰痛", "A", "麦氏点压痛",
         "消化系统", "外科", "临床医学", "医学知识", "简单"],
        ["糖尿病的典型症状包括", "A 多饮\nB 多尿\nC 多食\nD 体重增加\nE 发热", "CBA", "", "内分泌", "内科", "临床医学",
         "医学知识", "中等"],
        ["没有答案的题", "A 甲\nB 乙", "", "", "", "内科", "", "", ""],
    ]
    write_cmexam_fixture(tmp_path / "cmexam.csv", rows)
    with pytest.warns(UserWarning, match="skipped 1 row"):
        items = load_benchmark("cmexam", tmp_path / "cmexam.csv")
    assert [i.answer for i in items] == ["A", "ABC"] and items[1].multi_answer
    assert items[0].options["A"] == "转移性右下腹痛" and len(items[0].options) == 5
    assert score("cmexam", items, {"0": "A", "1": "AB"})["by_group"] == {"外科": 1.0, "内科": 0.0}
    write_cmexam_fixture(tmp_path / "bad.csv", [["题", "A 甲\n乙没有字母", "A", "", "", "内科", "", "", ""]])
    with pytest.raises(EvalDataError, match=r"bad.csv: row 2: option line '乙没有字母'"):
        load_benchmark("cmexam", tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("Question,Answer\nq,A\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"cols.csv: missing column\(s\) \['Options'\]"):
        load_benchmark("cmexam", tmp_path / "cols.csv")


def test_extract_letters():
    assert extract_letters("A、C、D", "ABCDE") == "ACD"
    assert extract_letters("\n答案：b,a", "ABCD") == "AB"
    assert extract_letters("不知道", "ABCD") == ""
    assert extract_letters("E F", "ABCD") == ""


def test_score_rules():
    items = [MCQ("1", "q", {"A": "a", "B": "b", "C": "c"}, "AC", "s"), MCQ("2", "q", {"A": "a", "B": "b"}, "B", "s")]
    assert score("cmexam", items, {"1": "ca", "2": "B"})["accuracy"] == 1.0
    assert score("cmexam", items, {"1": "A"})["accuracy"] == 0.0  # a subset is wrong; missing is wrong
    with pytest.raises(ValueError, match="has no answer"):
        score("cmb", [MCQ("3", "q", {"A": "a"}, "", "s")], {})


@needs_cmmlu
def test_eval_command_runs_a_tiny_model_in_logits_mode(tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--benchmark", "cmmlu-med", "--data", str(CMMLU), "--model", "tiny", "--limit", "12",
                     "--shots", "1", "--output-dir", str(out), "--no-progress", "--batch-size", "5"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(r["prediction"] in "ABCD" and r["method"] == "logits" for r in records)
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 12 and report["correct"] == sum(r["correct"] for r in records)
    assert "| anatomy (解剖学) |" in (out / "report.md").read_text()
    assert "overall accuracy" in capsys.readouterr().out


def test_eval_command_generates_for_multi_answer_items_and_scores_files(tmp_path, capsys):
    questions, key = write_cmb_fixture(tmp_path)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--benchmark", "cmb", "--data", str(questions), "--answers", str(key), "--model",
                     "tiny", "--output-dir", str(out), "--no-progress"]) == 0
    records = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert records["1"]["method"] == "logits" and records["2"]["method"] == "generate"
    assert set(records["2"]["prediction"]) <= set("ABCD")
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prediction": "a"}\n{"id": 2, "prediction": "bad"}\n')
    assert cli.main(["eval", "--score", "--benchmark", "cmb", "--predictions", str(tmp_path / "p.jsonl"),
                     "--answers", str(key)]) == 0
    assert "overall accuracy: **1.0000** (2/2)" in capsys.readouterr().out
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\n')
    assert cli.main(["eval", "--score", "--benchmark", "cmb", "--predictions", str(tmp_path / "broken.jsonl"),
                     "--answers", str(key)]) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err
