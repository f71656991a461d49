"""Training data formats (instruction, Alpaca, multiple choice, ShareGPT, TRL/OpenAI messages, TRL prompt-completion)
from JSON Lines and JSON array files, their one-line errors, and their rendering: plain, and with a chat template
(the real Qwen2/Qwen3 tokenizer, under a Qwen3-style template and a plain ChatML one), where the labels must be
exactly the assistant turns and the input ids exactly the tokenizer's render of the whole conversation."""

import json

import pytest

pytest.importorskip("transformers")

from sparsedoctor_kernels.train.data import (  # noqa: E402
    IGNORE,
    DataError,
    Message,
    build_tokenizer,
    chat_spans,
    corpus,
    encode,
    encode_example,
    format_example,
    read_records,
    to_conversation,
    trainable_examples,
)

from conftest import SHARED  # noqa: E402

QWEN2 = SHARED / "tokenizers" / "qwen2"
IM_END = "<|im_end|>"

# Qwen3's ChatML format, written small: a leading system message; the assistant turns after the last user turn
# (and the last one always) get a <think> block, the earlier ones lose theirs; with enable_thinking false the
# generation prompt carries an empty <think> block.
QWEN3_TEMPLATE = r"""
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
  {%- elif message.role == 'assistant' %}
    {%- set content = message.content %}{%- set reasoning = '' %}
    {%- if '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
      {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
    {%- else %}
      {{- '<|im_start|>assistant\n' + content }}
    {%- endif %}
    {{- '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""
CHATML_TEMPLATE = r"""
{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


def user(text):
    return Message("user", text)


def assistant(text, trained=True):
    return Message("assistant", text, trained)


# (record, the messages it reads as, whether plain rendering writes its prompt as it is)
FORMATS = {
    "instruction": ({"instruction": "头痛怎么办？", "response": "休息并就医。"},
                    (user("头痛怎么办？"), assistant("休息并就医。")), False),
    "alpaca": ({"instruction": "解释术语", "input": "贫血", "output": "血红蛋白低于正常。", "id": 7},
               (user("解释术语\n贫血"), assistant("血红蛋白低于正常。")), False),
    "alpaca-history": ({"instruction": "还有呢？", "input": "", "output": "补铁。", "system": "你是医生。",
                        "history": [["贫血吃什么？", "多吃红肉。"]]},
                       (Message("system", "你是医生。"), user("贫血吃什么？"), assistant("多吃红肉。"),
                        user("还有呢？"), assistant("补铁。")), False),
    "multiple-choice": ({"question": "首选治疗是", "options": ["手术", "口服铁剂"], "answer": "b"},
                        (user("以下是单项选择题，请选出正确答案。\n首选治疗是\nA. 手术\nB. 口服铁剂\n答案："),
                         assistant("B. 口服铁剂")), True),
    "sharegpt": ({"conversations": [{"from": "system", "value": "你是医生。"}, {"from": "human", "value": "发烧？"},
                                    {"from": "gpt", "value": "多喝水。"}, {"from": "human", "value": "还有？"},
                                    {"from": "gpt", "value": "测体温。"}]},
                 (Message("system", "你是医生。"), user("发烧？"), assistant("多喝水。"), user("还有？"),
                  assistant("测体温。")), False),
    "messages": ({"messages": [{"role": "user", "content": "咳嗽？"},
                               {"role": "assistant", "content": "先观察。", "weight": 0},
                               {"role": "user", "content": [{"type": "text", "text": "三天了"},
                                                            {"type": "text", "text": "。"}]},
                               {"role": "assistant", "content": "去医院。"}]},
                 (user("咳嗽？"), assistant("先观察。", trained=False), user("三天了。"), assistant("去医院。")),
                 False),
    "prompt-completion": ({"prompt": "Q: 失眠？\nA:", "completion": " 规律作息。"},
                          (user("Q: 失眠？\nA:"), assistant(" 规律作息。")), True),
    "prompt-completion-chat": ({"prompt": [{"role": "system", "content": "简答。"}, {"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
                                "completion": [{"role": "assistant", "content": "d"}]},
                               (Message("system", "简答。"), user("a"), assistant("b", trained=False), user("c"),
                                assistant("d")), False),
}


def _write(path, records, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif kind == "array":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    else:  # one line, as json.dump writes it
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_reads_the_same_from_jsonl_and_a_json_array(tmp_path, name):
    record, messages, verbatim = FORMATS[name]
    other = FORMATS["instruction"][0]
    files = {kind: _write(tmp_path / f"data-{kind}.{'jsonl' if kind == 'jsonl' else 'json'}", [other, record], kind)
             for kind in ("jsonl", "array", "array-one-line")}
    read = {kind: read_records(path) for kind, path in files.items()}
    for kind, records in read.items():
        assert records == [other, record], kind
        conversation = to_conversation(records[1])
        assert conversation.messages == messages and conversation.verbatim_prompt == verbatim, kind
    assert read["jsonl"][1].source == f"{files['jsonl']}:2"
    assert read["array"][1].source.startswith(f"{files['array']}:") and read["array"][1].source.endswith("element 1")


def test_json_lines_under_a_json_name_and_a_pretty_array_under_a_jsonl_name(tmp_path):
    records = [FORMATS["alpaca"][0], FORMATS["sharegpt"][0]]
    assert read_records(_write(tmp_path / "hf-export.json", records, "jsonl")) == records  # datasets' to_json
    assert read_records(_write(tmp_path / "pretty.jsonl", records, "array")) == records
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert read_records(bom) == records


def test_array_elements_are_named_by_line_and_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "response": "b"},\n\n  {"text": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert str(error.value) == (f"{path}:4: element 1: a record needs 'messages' (TRL/OpenAI), 'conversations' "
                                "(ShareGPT), 'prompt'+'completion' (TRL), 'instruction'+'output' (Alpaca) or "
                                "'instruction'+'response', or 'question'+'options'+'answer'; got keys ['text']")


BAD = [
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "q"}]}\n',
     "bad.jsonl:1: the conversation has no assistant turn to learn from"),
    ("bad.jsonl", '{"messages": [{"role": "tool", "content": "q"}]}\n',
     "bad.jsonl:1: messages[0]: 'role' must be one of system, user, assistant, got 'tool'"),
    ("bad.jsonl", '{"messages": [{"role": "user", "text": "q"}]}\n',
     "bad.jsonl:1: messages[0] content must be a string, got null"),
    ("bad.jsonl", '{"messages": [{"speaker": "user"}]}\n',
     "bad.jsonl:1: messages[0]: a message needs 'role'+'content' (or ShareGPT's 'from'+'value'), got keys ['speaker']"),
    ("bad.jsonl", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}, '
     '{"role": "assistant", "content": "a"}]}\n', "bad.jsonl:1: the conversation opens with an assistant turn"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     '{"role": "user", "content": "q2"}]}\n', "bad.jsonl:1: the conversation ends with a user message"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": [{"type": "image"}]}]}\n',
     "bad.jsonl:1: messages[0]: only text content parts are supported, got a 'image' part"),
    ("bad.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}\n',
     "bad.jsonl:1: conversations[0]: 'from' must be human, gpt or system"),
    ("bad.jsonl", '{"prompt": "q"}\n', "bad.jsonl:1: a prompt-completion record needs both 'prompt' and 'completion', "
     "got keys ['prompt']"),
    ("bad.jsonl", '{"prompt": "q", "completion": [{"role": "user", "content": "x"}]}\n',
     "bad.jsonl:1: 'completion' messages must all be the assistant's"),
    ("bad.jsonl", '{"instruction": "q", "output": 3}\n', "bad.jsonl:1: an instruction record needs a string "
     "'instruction' and a string 'response' (or Alpaca's 'output'), got keys ['instruction', 'output']"),
    ("bad.jsonl", '{"instruction": "q", "output": "a", "history": [["only one"]]}\n',
     "bad.jsonl:1: 'history' must be a list of [question, answer] string pairs"),
    ("bad.jsonl", '{"messages": [], "prompt": "q", "completion": "a"}\n',
     "bad.jsonl:1: the record holds the keys of more than one format (messages, prompt-completion)"),
    ("bad.jsonl", '[{"instruction": "q", "response": "a"}]\n',
     "bad.jsonl:1: expected a JSON object (one record a line), got an array; a file that is one JSON array"),
    ("bad.json", '[{"instruction": "q", "response": "a"},\n 42]', "bad.json:2: element 1: expected a JSON object "
     "(one record an element), got a number"),
    ("bad.json", '[{"instruction": "q", "response": "a"}\n {"instruction": "q"}]',
     "bad.json:2: malformed JSON (expected ',' or ']' after element 0)"),
    ("bad.json", '[{"instruction": "q", "response": "a"},\n {"instruction": ', "bad.json:2: malformed JSON"),
    ("bad.json", '[{"instruction": "q", "response": "a"}', "bad.json:1: malformed JSON (the array is not closed"),
    ("bad.json", '[{"instruction": "q", "response": "a"}]\n[]', "bad.json:2: malformed JSON (text after the array"),
    ("bad.json", "[\n]", "bad.json holds no records"),
]


@pytest.mark.parametrize("name, content, expected", BAD)
def test_bad_records_are_one_line_naming_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(tmp_path)) and expected in message, message


def _demo_tokenizer(records):
    return build_tokenizer(corpus(records), vocab_size=400)


def test_plain_multi_turn_learns_every_answer_and_its_eos():
    record = FORMATS["sharegpt"][0]
    tokenizer = _demo_tokenizer([record, FORMATS["multiple-choice"][0]])
    assert corpus([record]) == ["你是医生。\n问题：发烧？\n回答：多喝水。\n问题：还有？\n回答：测体温。"]
    (ids, labels), = encode([record], tokenizer, max_length=512)
    assert tokenizer.decode(ids) == "你是医生。\n问题：发烧？\n回答：多喝水。<eos>\n问题：还有？\n回答：测体温。<eos>"
    assert tokenizer.decode([t for t in labels if t != IGNORE]) == "多喝水。<eos>测体温。<eos>"
    with pytest.raises(DataError, match="multi-turn"):
        format_example(record)
    assert format_example(FORMATS["prompt-completion"][0]) == ("Q: 失眠？\nA:", " 规律作息。")


def test_modes_and_their_errors():
    tokenizer = _demo_tokenizer([FORMATS["instruction"][0]])
    record = FORMATS["instruction"][0]
    with pytest.raises(DataError, match=r"^--chat-template chat: the tokenizer has no chat template \(tokenizer"):
        encode([record], tokenizer, 64, chat_template="chat")
    with pytest.raises(DataError, match="--chat-template must be one of auto, chat, plain, got 'jinja'"):
        encode_example(record, tokenizer, 64, chat_template="jinja")
    assert encode([record], tokenizer, 64) == encode([record], tokenizer, 64, chat_template="plain")
    lines = []
    trainable_examples([record] * 2, tokenizer, 64, lines.append, enable_thinking=True)
    assert lines == ["warning: --enable-thinking has no effect: the data is rendered plain (no chat template is used)"]


# --- the real tokenizer under chat templates ------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen():
    if not QWEN2.is_dir():
        pytest.skip(f"{QWEN2} not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN2)


@pytest.fixture(params=["qwen3", "chatml"])
def templated(request, qwen, monkeypatch):
    monkeypatch.setattr(qwen, "chat_template", QWEN3_TEMPLATE if request.param == "qwen3" else CHATML_TEMPLATE)
    return qwen


def _runs(ids, labels):
    """The learnt tokens, as the contiguous runs of labelled positions."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


def _full_render(tokenizer, record, enable_thinking):
    chat = to_conversation(record).as_chat()
    return tokenizer.apply_chat_template(chat, tokenize=True, enable_thinking=enable_thinking)["input_ids"]


MULTI_TURN = {"messages": [
    {"role": "system", "content": "你是一名全科医生。"},
    {"role": "user", "content": "我最近总是头痛，怎么办？"},
    {"role": "assistant", "content": "<b>先休息</b>，记录头痛的时间和诱因。"},
    {"role": "user", "content": "还需要做检查吗？"},
    {"role": "assistant", "content": "如果持续一周以上，建议做头颅CT。"},
    {"role": "user", "content": "好的，谢谢。"},
    {"role": "assistant", "content": "不客气，祝早日康复。"}]}


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("name", ["instruction", "multiple-choice", "alpaca-history", "sharegpt", "messages",
                                  "prompt-completion-chat", "multi-turn"])
def test_chat_labels_are_exactly_the_learnt_assistant_turns(templated, name, enable_thinking):
    record = FORMATS[name][0] if name in FORMATS else MULTI_TURN
    (ids, labels), cut = encode_example(record, templated, 4096, enable_thinking=enable_thinking)  # auto: chat
    assert not cut and ids == _full_render(templated, record, enable_thinking)
    learnt = [m.content for m in to_conversation(record).messages if m.trained]
    # Qwen3 writes a <think> block into the last turn; with enable_thinking it is the model's to write, so learnt.
    think = "<think>\n\n</think>\n\n" if enable_thinking and templated.chat_template == QWEN3_TEMPLATE else ""
    expected = [text + IM_END for text in learnt[:-1]] + [think + learnt[-1] + IM_END]
    assert [templated.decode(run) for run in _runs(ids, labels)] == expected


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_qwen3_multi_turn_history_is_aligned_and_the_generation_prompt_is_not_learnt(qwen, monkeypatch,
                                                                                     enable_thinking):
    monkeypatch.setattr(qwen, "chat_template", QWEN3_TEMPLATE)
    text, spans = chat_spans(qwen, to_conversation(MULTI_TURN), enable_thinking)
    assert "</think>" in text and text.count("<think>") == 1  # only the last turn keeps a block: history rewritten
    contents = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    think = "<think>\n\n</think>\n\n" if enable_thinking else ""
    assert [text[a:b] for a, b in spans] == [c + IM_END for c in contents[:-1]] + [think + contents[-1] + IM_END]
    (ids, labels), _ = encode_example(MULTI_TURN, qwen, 4096, enable_thinking=enable_thinking)
    assert ids == _full_render(qwen, MULTI_TURN, enable_thinking)
    learnt = [i for i, label in enumerate(labels) if label != IGNORE]
    assert qwen.decode(ids[:learnt[0]]).endswith("<|im_start|>assistant\n")  # a history turn: no <think> block
    last_start = next(i for i in reversed(learnt) if labels[i - 1] == IGNORE)
    before_last = qwen.decode(ids[:last_start])
    # the last turn's prompt side is its generation prompt, with Qwen3's empty <think> block when thinking is off
    generation_prompt = qwen.apply_chat_template(MULTI_TURN["messages"][:-1], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=enable_thinking)
    assert before_last == generation_prompt
    assert before_last.endswith("<|im_start|>assistant\n" if enable_thinking else "<think>\n\n</think>\n\n")


def test_qwen3_reasoning_in_the_content_is_learnt_last_and_dropped_from_history(qwen, monkeypatch):
    monkeypatch.setattr(qwen, "chat_template", QWEN3_TEMPLATE)
    record = {"messages": [{"role": "user", "content": "发热？"},
                           {"role": "assistant", "content": "<think>\n先问体温\n</think>\n\n量体温。"},
                           {"role": "user", "content": "38.5度"},
                           {"role": "assistant", "content": "<think>\n中度发热\n</think>\n\n可服退热药。"}]}
    (ids, labels), _ = encode_example(record, qwen, 4096, enable_thinking=True)
    assert ids == _full_render(qwen, record, True)
    assert [qwen.decode(run) for run in _runs(ids, labels)] == [
        "量体温。" + IM_END, "<think>\n中度发热\n</think>\n\n可服退热药。" + IM_END]
    with pytest.raises(DataError, match=r"records\[0\]: .* not how it renders that turn \(a <think> block in an "
                                        r"answer, with enable_thinking off\?\)"):
        encode([record], qwen, 4096)


def test_the_shipped_template_in_auto_mode(qwen):
    assert qwen.chat_template  # the tokenizer's own (ChatML, with a default system message)
    (ids, labels), = encode([MULTI_TURN], qwen, 4096)
    assert ids == _full_render(qwen, MULTI_TURN, False)
    contents = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    assert [qwen.decode(run) for run in _runs(ids, labels)] == [c + IM_END for c in contents]
    (plain_ids, _), = encode([MULTI_TURN], qwen, 4096, chat_template="plain")
    assert qwen.decode(plain_ids).startswith("你是一名全科医生。\n问题：")


def test_a_bpe_merge_across_the_boundary_is_not_learnt_and_is_reported(qwen, monkeypatch):
    monkeypatch.setattr(qwen, "chat_template", CHATML_TEMPLATE)
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n换行开头的回答"}]}
    (ids, labels), _ = encode_example(record, qwen, 4096)
    assert ids == _full_render(qwen, record, False)  # "\n" + "\n" is one token, across the boundary
    assert [qwen.decode(run) for run in _runs(ids, labels)] == ["换行开头的回答" + IM_END]
    lines = []
    assert len(trainable_examples([record, FORMATS["instruction"][0]], qwen, 4096, lines.append)) == 2
    assert lines[0].startswith("data: rendered with the tokenizer's chat template")
    assert lines[1].startswith("warning: in 1 of 2 examples a token joins the end of a prompt and the start of an")


def test_truncation_cuts_from_the_end_and_drops_examples_left_without_an_answer(templated):
    full, _ = encode_example(MULTI_TURN, templated, 4096)
    start = next(i for i, label in enumerate(full[1]) if label != IGNORE)
    cut_at = start + 3  # inside the first answer
    (ids, labels), cut = encode_example(MULTI_TURN, templated, cut_at)
    assert cut and ids == full[0][:cut_at] and labels == full[1][:cut_at]
    short = {"messages": [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "休息。"}]}
    short_length = len(encode_example(short, templated, 4096)[0][0])
    assert short_length < start  # the short example fits where the long one has no answer token left
    lines = []
    kept = trainable_examples([MULTI_TURN, short], templated, start, lines.append)
    assert kept == [encode_example(short, templated, start)[0]]
    assert "warning: 1 of 2 examples are longer than --max-length" in lines[-1] and "1 of them lost" in lines[-1]
    with pytest.raises(DataError, match="cuts away the whole response of every one of the 1 examples"):
        trainable_examples([MULTI_TURN], templated, start, lines.append)


def test_a_template_error_names_the_record(tmp_path, qwen, monkeypatch):
    monkeypatch.setattr(qwen, "chat_template", "{{ raise_exception('roles must alternate') }}")
    path = _write(tmp_path / "data.jsonl", [FORMATS["instruction"][0]] * 2, "jsonl")
    with pytest.raises(DataError) as error:
        trainable_examples(read_records(path), qwen, 64, lambda *_: None, chat_template="chat")
    assert str(error.value) == f"{path}:1: the chat template cannot render this conversation: roles must alternate"
