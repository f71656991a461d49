"""Benchmark loaders, answer extraction, scoring (real CMMLU-Med data and the real CMB key when ../shared is
present), prompts, the runner on a tiny model, and the eval command. Every test runs in its tmp_path, so a
command that writes to a default directory writes there and nowhere else."""

import csv
import json
import os

import pytest

from sparsedoctor_kernels import cli
from sparsedoctor_kernels._util.files import write_atomically
from sparsedoctor_kernels.eval import (
    MCQ,
    EvalDataError,
    build_prompt,
    command,
    extract_answer,
    extract_letters,
    load_benchmark,
    load_cmb_key_items,
    normalize_letters,
    score,
)

from conftest import SHARED

CMMLU = SHARED / "data" / "cmmlu-med"
CMB_KEY = SHARED / "data" / "cmb" / "CMB-test-choice-answer.json"
needs_cmmlu = pytest.mark.skipif(not CMMLU.is_dir(), reason="../shared/data/cmmlu-med not present")
needs_cmb_key = pytest.mark.skipif(not CMB_KEY.is_file(), reason="../shared/data/cmb not present")



@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


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
    with pytest.warns(UserWarning, match=r"9200 prediction\(s\) hold no answer letter"):  # "Z" is no option
        result = score("cmb", items, predictions)
    assert result["no_answer"] == 9200 and result["missing"] == result["unknown_ids"] == 0
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
    with pytest.warns(UserWarning, match=r"prediction\(s\) hold no answer letter"):
        result = score("cmb", items, predictions)
    assert result["by_group"]["药师考试"]["accuracy"] == pytest.approx(len(right_classes) / len(pharmacist))


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
    with pytest.warns(UserWarning, match=r"1 item\(s\) have no prediction"):
        assert score("cmexam", items, {"1": "A"})["accuracy"] == 0.0  # a subset is wrong; missing is wrong
    with pytest.raises(ValueError, match="has no answer"):
        score("cmb", [MCQ("3", "q", {"A": "a"}, "", "s")], {})


@needs_cmmlu
def test_eval_command_runs_a_tiny_model_in_logits_mode(tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--benchmark", "cmmlu-med", "--data", str(CMMLU), "--model", "tiny", "--limit", "2",
                     "--shots", "1", "--output-dir", str(out), "--no-progress", "--batch-size", "5"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # The default protocol for CMMLU-Med: lm-evaluation-harness's, the " A" continuations' log-likelihoods.
    assert len(records) == 14 and all(r["prediction"] in "ABCD" and r["method"] == "loglikelihood" for r in records)
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 14 and report["correct"] == sum(r["correct"] for r in records)
    assert len(report["by_group"]) == 7  # --limit is per subject: all seven are there
    assert "| anatomy (解剖学) |" in (out / "report.md").read_text()
    assert "overall accuracy" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:score:UserWarning")  # a random tiny model may generate no letter at all
def test_eval_command_generates_for_multi_answer_items_and_scores_files(tmp_path, capsys):
    questions, key = write_cmb_fixture(tmp_path)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--benchmark", "cmb", "--data", str(questions), "--answers", str(key), "--model",
                     "tiny", "--output-dir", str(out), "--no-progress", "--protocol", "sparsedoctor"]) == 0
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


# What other tools write: bare letters (any case), "B. text" (option echoed), Chinese and English answer
# cues, lm-evaluation-harness's logged lists and JSON, full-width letters and punctuation, and no answer.
EXTRACTION_CASES = [
    ("B", "B"), ("b", "B"), ("dca", "ACD"), ("A、C、D", "ACD"), ("(B)", "B"), ("（Ｄ）", "D"), ("Ｂ", "B"),
    ("B. 皮肤", "B"), ("B皮肤", "B"), ("答案：B", "B"), ("答案：Ｂ。", "B"), ("答案：A,C", "AC"), ("答案：A，C", "AC"),
    ("答案是 A、C", "AC"), ("正确答案为B", "B"), ("答案应该是D", "D"), ("答案：b", "B"), ("**答案：C**", "C"),
    ("选B", "B"), ("故选A。", "A"), ("选项B是错误的，正确的是C", "C"), ("A和C", "AC"),
    ("The answer is C", "C"), ("the answer is (C)", "C"), ("Answer: B", "B"), ("answer: b", "B"),
    ("The correct answer is option D.", "D"), ('["B"]', "B"), ('[["B"]]', "B"), ('{"answer": "C"}', "C"),
    ("I think B is right", "B"), ("\n答案：b,a", "AB"),
    ("不知道", ""), ("", ""), ("E F", ""), ("答案：E", ""), ("Correct", ""), ("DNA", ""), ("the answer is a rash", ""),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_answer_reads_the_formats_other_tools_write(text, expected):
    assert extract_answer(text, "ABCD") == expected


def test_extract_answer_keeps_to_the_items_options():
    assert extract_answer("A、C、D", "ABCDE") == "ACD"
    assert extract_answer("E", "ABCDE") == "E" and extract_answer("E", "ABCD") == ""
    assert extract_answer("答案：F") == "F"  # no options known (CMB's key): A-H count
    assert extract_letters is extract_answer  # one extractor for generated text and prediction files


def test_normalize_letters_counts_latin_letters_only():
    assert normalize_letters("dca") == "ACD" and normalize_letters("Ｂ") == "B"
    assert normalize_letters("B皮肤") == "B" and normalize_letters("答案") == ""


def test_score_extracts_answers_from_text_predictions():
    items = [MCQ("1", "q", {"A": "皮肤", "B": "肝", "C": "肺", "D": "心"}, "B", "s"),
             MCQ("2", "q", {"A": "a", "B": "b", "C": "c", "D": "d"}, "C", "s"),
             MCQ("3", "q", {"A": "a", "B": "b", "C": "c", "D": "d"}, "ACD", "s"),
             MCQ("4", "q", {"A": "a", "B": "b", "C": "c", "D": "d"}, "A", "s")]
    predictions = {"1": "B. 肝", "2": "The answer is C", "3": "答案：A、C、D", "4": "答案：A"}
    result = score("cmexam", items, predictions)
    assert result["accuracy"] == 1.0 and result["no_answer"] == 0


def test_score_warns_about_unknown_ids_missing_items_and_unreadable_predictions():
    items = [MCQ(str(n), "q", {"A": "a", "B": "b"}, "A", "s") for n in range(4)]
    with pytest.warns(UserWarning) as caught:
        result = score("cmexam", items, {"0": "A", "1": "不知道", "7": "A", "8": "B"})
    message = str(caught[0].message)
    assert "2 prediction id(s) match no item" in message and "(e.g. 7, 8)" in message
    assert "2 item(s) have no prediction" in message and "1 prediction(s) hold no answer letter" in message
    assert (result["unknown_ids"], result["missing"], result["no_answer"], result["correct"]) == (2, 2, 1, 1)
    assert result["n"] == 4


def run_score_file(tmp_path, lines, name="p.jsonl", *extra):
    questions, key = write_cmb_fixture(tmp_path)
    path = tmp_path / name
    path.write_bytes(lines if isinstance(lines, bytes) else lines.encode("utf-8"))
    return cli.main(["eval", "--score", "--benchmark", "cmb", "--predictions", str(path), "--answers", str(key),
                     *extra])


def test_score_command_reads_tool_outputs_with_a_bom(tmp_path, capsys):
    lines = '\ufeff{"id": 1, "prediction": "答案：A"}\n{"id": 2, "prediction": ["A", "B", "D"]}\n'
    assert run_score_file(tmp_path, lines) == 0
    assert "overall accuracy: **1.0000** (2/2)" in capsys.readouterr().out


@pytest.mark.parametrize(("content", "where"), [
    (b'{"id": 1, "prediction": "A"}\n{"id": 2, "prediction": \n', "p.jsonl:2: malformed JSON"),
    (b'{"id": 1, "prediction": "A"}\n{"id": 2, "prediction": "\xb4\xf0"}\n', "p.jsonl:2: not UTF-8"),
    (b'{"id": 1, "prediction": "A"}\n3\n', "p.jsonl:2: expected"),
    (b'"A"\n', "p.jsonl:1: expected"),
    (b'{"id": 1, "prediction": 1}\n', "p.jsonl:1: \"prediction\" must be a string"),
    (b'{"id": 1, "prediction": "A"}\n{"id": 1, "prediction": "B"}\n', "p.jsonl:2: id 1 already"),
    (b"\n\n", "holds no predictions"),
])
def test_bad_predictions_files_are_one_line_errors(tmp_path, capsys, content, where):
    assert run_score_file(tmp_path, content) == 2
    err = capsys.readouterr().err
    assert where in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    questions, key = write_cmb_fixture(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prediction": "A"}\n')
    runs = [(["--score", "--benchmark", "cmb", "--predictions", str(tmp_path / "nope.jsonl"), "--answers", str(key)],
             "nope.jsonl does not exist"),
            (["--score", "--benchmark", "cmb", "--predictions", str(tmp_path), "--answers", str(key)],
             "is not a file"),
            (["--score", "--benchmark", "cmb", "--predictions", str(tmp_path / "p.jsonl"), "--answers",
              str(tmp_path / "nokey.json")], "nokey.json does not exist"),
            (["--score", "--benchmark", "cmmlu-med", "--predictions", str(tmp_path / "p.jsonl")], "needs --data"),
            (["--benchmark", "cmb", "--data", str(tmp_path / "none.json")], "none.json does not exist"),
            (["--benchmark", "cmmlu-med"], "--data is required"),
            (["--benchmark", "cmmlu-med", "--data", str(questions)], "expected the CMMLU root directory"),
            (["--benchmark", "cmb", "--data", str(questions), "--model", str(tmp_path / "m")], "--model"),
            (["--benchmark", "cmb", "--data", str(questions), "--adapter", str(tmp_path / "a")], "--adapter")]
    for flags, message in runs:
        assert cli.main(["eval", *flags, "--output-dir", str(tmp_path / "out")]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "out").exists()  # created for the run, removed again when it failed


def test_bad_data_files_are_one_line_errors_and_a_bom_is_fine(tmp_path, capsys):
    questions, key = write_cmb_fixture(tmp_path)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + questions.read_bytes())
    assert [i.answer for i in load_benchmark("cmb", tmp_path / "bom.json", answers=key)] == ["A", "ABD"]
    (tmp_path / "gbk.json").write_bytes('[{"question": "题"}]'.encode("gbk"))
    with pytest.raises(EvalDataError, match=r"gbk.json:1: not UTF-8"):
        load_benchmark("cmb", tmp_path / "gbk.json")
    (tmp_path / "ints.json").write_text("[1, 2]")
    with pytest.raises(EvalDataError, match=r"ints.json: entry 0: expected a JSON object, got int"):
        load_benchmark("cmb", tmp_path / "ints.json")
    (tmp_path / "gbk.csv").write_bytes("Question,Options,Answer\n题,A 甲,A\n".encode("gbk"))
    assert cli.main(["eval", "--benchmark", "cmexam", "--data", str(tmp_path / "gbk.csv"), "--output-dir",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gbk.csv:2: not UTF-8" in err and err.count("\n") == 1


@pytest.fixture
def nothing_may_load(monkeypatch):
    """Loading data or a model fails the test: the output directory must be checked first."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before checking --output-dir")

    for name in ("load_benchmark", "load_cmb_key_items", "load_model", "read_predictions"):
        monkeypatch.setattr(command, name, refuse)


@pytest.mark.parametrize("flags", [["--benchmark", "cmb", "--data", "q.json"],
                                   ["--score", "--benchmark", "cmb", "--predictions", "p.jsonl", "--answers", "k"]])
def test_a_bad_output_dir_fails_before_any_loading(tmp_path, capsys, nothing_may_load, flags):
    (tmp_path / "a-file").write_text("x")
    for output_dir, message in ((tmp_path / "a-file", "exists and is not a directory"),
                                (tmp_path / "a-file" / "out", "cannot write there")):
        assert cli.main(["eval", *flags, "--output-dir", str(output_dir)]) == 2
        err = capsys.readouterr().err
        assert f"--output-dir {output_dir}: {message}" in err and err.count("\n") == 1


def test_a_read_only_output_dir_fails_before_any_loading(tmp_path, capsys, nothing_may_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) may write to read-only directories")
        assert cli.main(["eval", "--benchmark", "cmb", "--data", "q.json", "--output-dir", str(locked / "o")]) == 2
        assert "cannot write there" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_write_atomically_leaves_no_partial_file(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "report.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_score_without_output_dir_prints_and_writes_nothing(tmp_path, capsys):
    assert run_score_file(tmp_path, '{"id": 1, "prediction": "A"}\n{"id": 2, "prediction": "ABD"}\n') == 0
    assert "overall accuracy: **1.0000** (2/2)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmb.json", "key.json", "p.jsonl"]
    with pytest.warns(UserWarning, match="match no item"):
        assert run_score_file(tmp_path, '{"id": 1, "prediction": "A"}\n{"id": 3, "prediction": "A"}\n', "p.jsonl",
                              "--output-dir", str(tmp_path / "reports")) == 0
    report = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert (report["correct"], report["unknown_ids"], report["missing"]) == (1, 1, 1)
    assert "1 prediction id(s) match no item (ignored)" in (tmp_path / "reports" / "report.md").read_text()


def write_cmmlu_fixture(root, subjects, rows=3):
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        for subject in subjects:
            with (root / split / f"{subject}.csv").open("w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                writer.writerows([[n, f"{subject} 题 {n}", "甲", "乙", "丙", "丁", "ABCD"[n % 4]] for n in range(rows)])


def test_limit_applies_per_subject_and_keeps_every_subject(tmp_path):
    write_cmmlu_fixture(tmp_path / "cmmlu", ["anatomy", "virology"])
    assert cli.main(["eval", "--benchmark", "cmmlu-med", "--data", str(tmp_path / "cmmlu"), "--subjects", "anatomy",
                     "virology", "--limit", "2", "--no-progress"]) == 0
    records = (tmp_path / "sparsedoctor-eval" / "predictions.jsonl").read_text().splitlines()  # the default dir
    assert [json.loads(r)["id"] for r in records] == ["anatomy/0", "anatomy/1", "virology/0", "virology/1"]
    assert json.loads((tmp_path / "sparsedoctor-eval" / "report.json").read_text())["missing"] == 0


# Without an answer cue, only a capital letter standing alone is an answer: never an article ("A patient"), a
# name ("Hepatitis B virus"), an abbreviation or code ("ECG", "BCG", "ACE", "CD4") or a vitamin ("B12").
FALLBACK_NEGATIVES = ["A patient with fever", "应做ECG检查", "BCG疫苗", "ACE抑制剂", "CD4细胞", "维生素B12缺乏",
                      "Hepatitis B virus", "A patient presenting like this...", "B-cell lymphoma", "Vitamin B's role"]
FALLBACK_POSITIVES = [("B. 皮肤", "B"), ("B", "B"), ("正确答案是 B 。", "B"), ("A、C、D 都对", "ACD"),
                      ("A, C", "AC"), ("A and C are correct", "AC"), ("我认为是 C。", "C"), ("B皮肤", "B")]


@pytest.mark.parametrize("text", FALLBACK_NEGATIVES)
def test_extract_answer_ignores_letters_of_words_and_abbreviations(text):
    assert extract_answer(text, "ABCD") == ""
    assert extract_answer(text) == ""  # nor with the default A-H (CMB's key)


@pytest.mark.parametrize(("text", "expected"), FALLBACK_POSITIVES)
def test_extract_answer_reads_standalone_letters(text, expected):
    assert extract_answer(text, "ABCD") == expected


def test_prose_predictions_are_no_answers_not_lucky_hits():
    items = [MCQ(str(n), "q", {}, "A", "s") for n in range(3)]
    with pytest.warns(UserWarning, match=r"3 prediction\(s\) hold no answer letter"):
        result = score("cmb", items, {str(n): "A patient presenting like this..." for n in range(3)})
    assert (result["correct"], result["no_answer"]) == (0, 3)


def _saved_tiny_adapter(directory):
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor, save_adapter

    base, _ = command.load_model("tiny", None, None, "cpu")
    config = SparseDoctorConfig(num_experts=2, top_k=2, r=2, proj_dim=4, queue_size=4, target_modules=["q_proj"])
    save_adapter(apply_sparsedoctor(base, config), directory)
    return directory


def test_bad_adapters_and_models_are_one_line_errors(tmp_path, capsys):
    questions, key = write_cmb_fixture(tmp_path)
    pickled = _saved_tiny_adapter(tmp_path / "pickled")
    (pickled / "x.bin").write_bytes(b"\x80\x04")
    typed = _saved_tiny_adapter(tmp_path / "typed")
    config = json.loads((typed / "adapter_config.json").read_text())
    config["sparsedoctor"]["num_experts"] = "3"
    (typed / "adapter_config.json").write_text(json.dumps(config))
    garbage = _saved_tiny_adapter(tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "empty-model").mkdir()
    runs = [(["--adapter", str(pickled)], "pickle"), (["--adapter", str(typed)], "num_experts"),
            (["--adapter", str(garbage)], "safetensors"), (["--model", str(tmp_path / "empty-model")], "config.json")]
    for flags, message in runs:
        code = cli.main(["eval", "--benchmark", "cmb", "--data", str(questions), "--answers", str(key), *flags,
                         "--output-dir", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and flags[0] in err and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "out").exists()


def test_the_adapter_config_is_checked_before_any_loading(tmp_path, capsys, nothing_may_load):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"format_version": 1}')
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert cli.main(["eval", "--benchmark", "cmb", "--data", "q.json", "--adapter", str(tmp_path / "adapter")]) == 2
    assert "--adapter" in capsys.readouterr().err
    (tmp_path / "empty-model").mkdir()
    assert cli.main(["eval", "--benchmark", "cmb", "--data", "q.json", "--model", str(tmp_path / "empty-model")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_score_applies_limit_as_the_run_does(tmp_path, capsys):
    write_cmmlu_fixture(tmp_path / "cmmlu", ["anatomy", "virology"])
    common = ["--benchmark", "cmmlu-med", "--data", str(tmp_path / "cmmlu"), "--subjects", "anatomy", "virology",
              "--limit", "2"]
    assert cli.main(["eval", *common, "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "report.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--score", *common, "--predictions", str(tmp_path / "run" / "predictions.jsonl"),
                     "--output-dir", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "report.json").read_text())
    assert (scored["n"], scored["missing"], scored["correct"]) == (4, 0, run["correct"])
    assert scored["by_group"] == run["by_group"]
    questions, key = write_cmb_fixture(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prediction": "A"}\n')
    assert cli.main(["eval", "--score", "--benchmark", "cmb", "--predictions", str(tmp_path / "p.jsonl"),
                     "--answers", str(key), "--limit", "1"]) == 0
    assert "overall accuracy: **1.0000** (1/1)" in capsys.readouterr().out


def test_output_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "report.json", "{}")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o002)
        write_atomically(tmp_path / "report.md", "x")
        assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_a_partial_answer_key_says_which_items_it_lacks(tmp_path, capsys):
    questions, key = write_cmb_fixture(tmp_path)
    (tmp_path / "partial.json").write_text(json.dumps(json.loads(key.read_text())[:1], ensure_ascii=False))
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prediction": "A"}\n')
    assert cli.main(["eval", "--score", "--benchmark", "cmb", "--data", str(questions), "--answers",
                     str(tmp_path / "partial.json"), "--predictions", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "partial.json: the key lacks 1 of the 2 item(s)" in err and "(id(s) 2)" in err
    assert "pass --answers" not in err and err.count("\n") == 1
