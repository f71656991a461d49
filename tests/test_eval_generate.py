"""Generation in `sparsedoctor eval`: the KV-cache greedy decode (the model's `generate`, or the incremental
loop for models that only have a forward) against a full-recompute reference and against batches of one,
stopping at end-of-sequence, answers read after a `<think>` block (none from an unterminated one), and prompts
rendered by a chat template (the real Qwen2 tokenizer's, and a Qwen3-style one with enable_thinking)."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparsedoctor_kernels import cli
from sparsedoctor_kernels.eval import MCQ, build_prompt, evaluate, extract_answer, score
from sparsedoctor_kernels.eval.answers import opens_thinking, strip_thinking
from sparsedoctor_kernels.eval.generation import greedy_generate, stop_token_ids
from sparsedoctor_kernels.eval.prompts import NoChatTemplateError, chat_prompt
from sparsedoctor_kernels.model.tiny import tiny_qwen3
from sparsedoctor_kernels.train.data import build_tokenizer, corpus, demo_records

from conftest import SHARED

QWEN2_TOKENIZER = SHARED / "tokenizers" / "qwen2"
needs_qwen2 = pytest.mark.skipif(not QWEN2_TOKENIZER.is_dir(), reason="../shared/tokenizers/qwen2 not present")

# The name this transformers version gives the KV cache in outputs and as the forward's argument.
CACHE_NAME = next(name for name in ("cache", "past_key_values") if name in CausalLMOutputWithPast.__dataclass_fields__)

# Items with prompts of different lengths, so a batch holds left padding. No answer is A, the letter a stand-in
# that knows nothing scores first (all letters tie).
ITEMS = [
    MCQ("1", "缺铁性贫血的首选检查是", {"A": "骨髓穿刺", "B": "血清铁蛋白", "C": "胃镜", "D": "心电图"}, "B", "内科"),
    MCQ("2", "急性阑尾炎最典型的早期症状是什么，请结合转移性腹痛的特点回答",
        {"A": "腰痛", "B": "转移性右下腹痛", "C": "胸痛", "D": "头痛"}, "B", "外科"),
    MCQ("3", "属于生命体征的是", {"A": "血型", "B": "身高", "C": "体温", "D": "肤色"}, "C", "护理"),
    MCQ("4", "糖尿病典型症状", {"A": "发热", "B": "咳嗽", "C": "皮疹", "D": "多饮多尿"}, "D", "内科"),
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def small_tokenizer():
    """The `--model tiny` tokenizer: byte-level BPE with <pad> and <eos>, and no chat template."""
    return build_tokenizer(corpus(demo_records()))


@pytest.fixture
def qwen2_tokenizer():
    if not QWEN2_TOKENIZER.is_dir():
        pytest.skip("../shared/tokenizers/qwen2 not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)


class _Seen:
    """ScriptedLM's 'KV cache': each row's real tokens so far, and where its prompt ended (None: not yet)."""

    def __init__(self, rows: int):
        self.tokens = [[] for _ in range(rows)]
        self.prompt_length: list[int | None] = [None] * rows
        self.question: list[str | None] = [None] * rows
        self.columns = 0  # positions seen, padding included


class ScriptedLM(nn.Module):
    """A stand-in causal LM whose greedy continuation of a prompt is the scripted reply to the question in it,
    then eos, then junk forever; before its prompt ends (the text ends with `prompt_end` after a question) it
    predicts junk. Each position's prediction depends only on the real tokens up to it, as an LM's does. It has
    only a forward, so the runner drives it as any forward-only model: the prompt once, then one new token per
    row with the cache it returned (checked), under the cache name this transformers version uses."""

    def __init__(self, tokenizer, replies: dict[str, str], prompt_end: str = "答案：", junk: str = "E"):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # where the runner looks up the device
        self.tokenizer, self.prompt_end = tokenizer, prompt_end
        self.replies = {question: tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                        for question, reply in replies.items()}
        self.junk = tokenizer(junk, add_special_tokens=False)["input_ids"][0]
        self.vocab_size = len(tokenizer)
        self.forward_calls = 0

    def _predict(self, seen: _Seen, row: int) -> int:
        tokens = seen.tokens[row]
        if seen.prompt_length[row] is None:
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            if text.endswith(self.prompt_end):
                asked = [question for question in self.replies if question in text]
                if asked:
                    seen.prompt_length[row], seen.question[row] = len(tokens), asked[0]
        if seen.prompt_length[row] is None:
            return self.junk
        reply = self.replies[seen.question[row]]
        step = len(tokens) - seen.prompt_length[row]
        return reply[step] if step < len(reply) else self.junk

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False, logits_to_keep=0, **kwargs):
        self.forward_calls += 1
        seen = kwargs.get(CACHE_NAME)
        if seen is None:
            seen = _Seen(input_ids.shape[0])
            self.seen_prompt = input_ids[0][attention_mask[0].bool()].tolist()  # the first row's, as given
        else:
            assert input_ids.shape[1] == 1, "with a cache, the runner must feed only the new token"
            assert attention_mask.shape[1] == seen.columns + 1, "the mask must cover the cached and new positions"
        predicted = torch.full(input_ids.shape, self.junk)  # padding positions: junk, never to be read
        new_mask = attention_mask[:, -input_ids.shape[1]:]
        for row in range(input_ids.shape[0]):
            for column in range(input_ids.shape[1]):
                if new_mask[row, column]:
                    seen.tokens[row].append(int(input_ids[row, column]))
                    predicted[row, column] = self._predict(seen, row)
        seen.columns += input_ids.shape[1]
        if logits_to_keep:
            predicted = predicted[:, -logits_to_keep:]
        logits = torch.zeros(*predicted.shape, self.vocab_size).scatter_(-1, predicted[..., None], 10.0)
        return CausalLMOutputWithPast(logits=logits, **({CACHE_NAME: seen} if use_cache else {}))


THINKING_REPLIES = {
    # A letter inside the reasoning (C, A) that a think-blind extractor would take first.
    ITEMS[0].question: "<think>\n也许选C？不对，血清铁蛋白最敏感。\n</think>\n\n答案：B",
    ITEMS[1].question: "<think>\n先排除A：腰痛不典型。\n\n</think>\n\nB",
    ITEMS[2].question: "\n\nC",  # starts with newlines: a stop at the first newline would find no answer
    ITEMS[3].question: "<think>\n多饮多尿是三多一少的表现，选D。</think>D",
}


def test_thinking_replies_are_scored_after_the_think_block_and_stop_at_eos(small_tokenizer):
    model = ScriptedLM(small_tokenizer, THINKING_REPLIES)
    records = evaluate(model, small_tokenizer, "cmexam", ITEMS, mode="generate", batch_size=3, max_new_tokens=64,
                       progress=False)
    assert [r["prediction"] for r in records] == ["B", "B", "C", "D"]
    assert all(r["correct"] and r["method"] == "generate" and r["finish_reason"] == "stop" for r in records)
    # The raw reply, reasoning included, is kept beside the answer; nothing of the junk after eos.
    assert [r["output"] for r in records] == [THINKING_REPLIES[item.question] for item in ITEMS]
    longest = max(len(model.replies[item.question]) for item in ITEMS)
    assert model.forward_calls <= 2 * longest  # two batches, each ended when its rows reached eos, not at 64
    assert small_tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was


def test_an_unterminated_think_block_holds_no_answer(small_tokenizer):
    guess = "<think>\n答案应该是A吧？"
    model = ScriptedLM(small_tokenizer, {ITEMS[0].question: guess + "再想想骨髓穿刺虽然准确但有创。</think>\n\nB"})
    budget = len(small_tokenizer(guess, add_special_tokens=False)["input_ids"]) + 2
    with pytest.warns(UserWarning, match=r"1 generated repl\(ies\) ended inside an unterminated <think> block "
                                         rf"\(1 of them when max_new_tokens={budget} ran out\)"):
        (record,) = evaluate(model, small_tokenizer, "cmexam", ITEMS[:1], mode="generate", max_new_tokens=budget,
                             progress=False)
    budget = model.replies[ITEMS[0].question][:budget]
    assert record["output"] == small_tokenizer.decode(budget) and record["output"].startswith("<think>")
    assert (record["prediction"], record["finish_reason"], record["correct"]) == ("", "length", False)
    assert extract_answer(record["output"].replace("<think>", ""), "ABCD") == "A"  # the guess it must not make


def test_strip_thinking_and_prompts_that_open_the_block():
    assert strip_thinking("<think>x</think>\n\nB") == "\n\nB" and strip_thinking("B") == "B"
    assert strip_thinking("<think>选A") is None and strip_thinking("选A", in_thinking=True) is None
    assert strip_thinking("选A</think>C", in_thinking=True) == "C"
    assert extract_answer("<think>A</think>B\n", "ABCD") == "B" and extract_answer("<think>选A", "ABCD") == ""
    assert opens_thinking("<|im_start|>assistant\n<think>\n") and not opens_thinking("a<think>\n\n</think>\n\n")
    assert not opens_thinking("<|im_start|>assistant\n")


STEPS = 6


@torch.no_grad()
def _reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The old decode: one row, the whole sequence recomputed for every new token, no cache, no padding, no
    stop (cut `_until_stop` for one)."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def _until_stop(tokens: list[int], stop_ids) -> list[int]:
    return next((tokens[:at] for at, token in enumerate(tokens) if token in stop_ids), tokens)


class ForwardOnly(nn.Module):
    """A real Hugging Face model behind a module with only a forward (as a wrapper without `generate`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, **kwargs):
        return self.model(**kwargs)


@pytest.fixture(scope="module")
def tiny_model(small_tokenizer):
    # float32, as float64 makes transformers' eager attention NaN on fully padded query rows.
    return tiny_qwen3(vocab_size=len(small_tokenizer), seed=3).eval()


@pytest.fixture(scope="module")
def prompt_ids(small_tokenizer):
    return [small_tokenizer(build_prompt("cmexam", item), add_special_tokens=False)["input_ids"] for item in ITEMS]


@pytest.fixture(scope="module")
def reference(tiny_model, prompt_ids):
    return [_reference_greedy(tiny_model, ids, STEPS) for ids in prompt_ids]


@pytest.mark.parametrize("path", ["generate", "forward-only"])
def test_batched_left_padded_generation_equals_one_row_and_full_recompute(small_tokenizer, tiny_model, reference,
                                                                          path):
    model = tiny_model if path == "generate" else ForwardOnly(tiny_model)
    batched = evaluate(model, small_tokenizer, "cmexam", ITEMS, mode="generate", batch_size=4,
                       max_new_tokens=STEPS, progress=False)
    alone = evaluate(model, small_tokenizer, "cmexam", ITEMS, mode="generate", batch_size=1, max_new_tokens=STEPS,
                     progress=False)
    assert [r["output"] for r in batched] == [r["output"] for r in alone]
    stops = stop_token_ids(small_tokenizer, tiny_model)
    for record, tokens in zip(batched, reference):
        expected = small_tokenizer.decode(_until_stop(tokens, stops))
        assert record["output"] == expected and record["prediction"] == extract_answer(expected, "ABCD")


@pytest.mark.parametrize("path", ["generate", "forward-only"])
def test_each_row_stops_at_its_own_stop_token(small_tokenizer, tiny_model, prompt_ids, reference, path):
    stops = sorted({reference[0][2], reference[1][4]})  # row 0 stops by step 2, row 1 by step 4, others maybe never
    small_tokenizer.padding_side = "left"
    try:
        batch = small_tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt")
    finally:
        small_tokenizer.padding_side = "right"
    model = tiny_model if path == "generate" else ForwardOnly(tiny_model)
    replies = greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=STEPS,
                              stop_ids=stops, pad_id=small_tokenizer.pad_token_id)
    for reply, tokens in zip(replies, reference):
        expected = _until_stop(tokens, stops)
        assert reply.tokens == expected
        assert reply.finish_reason == ("stop" if len(expected) < STEPS else "length")
    assert replies[0].finish_reason == "stop" and len(replies[0].tokens) <= 2


def test_the_adapted_model_generates_the_same_batched_and_alone(small_tokenizer):
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor

    base = tiny_qwen3(vocab_size=len(small_tokenizer), seed=1)
    config = SparseDoctorConfig(num_experts=3, top_k=2, r=2, proj_dim=4, queue_size=4, target_modules=["q_proj"])
    model = apply_sparsedoctor(base, config)
    with torch.no_grad():
        for module in model.adapted_modules().values():
            module.lora_b.normal_(0, 0.5)  # a trained-looking adapter, so routing changes the outputs
    batched = evaluate(model, small_tokenizer, "cmexam", ITEMS, mode="generate", batch_size=4, max_new_tokens=4,
                       progress=False)
    alone = evaluate(model, small_tokenizer, "cmexam", ITEMS, mode="generate", batch_size=1, max_new_tokens=4,
                     progress=False)
    assert [r["output"] for r in batched] == [r["output"] for r in alone]


def test_without_a_chat_template_the_flag_is_a_one_line_error(small_tokenizer, tmp_path, capsys):
    with pytest.raises(NoChatTemplateError, match="has no chat template"):
        chat_prompt(small_tokenizer, "题目")
    (tmp_path / "q.csv").write_text('Question,Options,Answer\n缺铁性贫血的首选检查是,"A 铁蛋白\nB 胃镜",A\n',
                                    encoding="utf-8")
    code = cli.main(["eval", "--benchmark", "cmexam", "--data", str(tmp_path / "q.csv"), "--model", "tiny",
                     "--chat-template", "--no-progress", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--chat-template: the tokenizer of --model tiny has no chat template" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--enable-thinking"], "--enable-thinking is passed to the chat template: it needs --chat-template"),
    (["--enable-thinking", "--chat-template"], "--enable-thinking needs --mode generate"),
])
def test_thinking_flags_are_checked_before_anything_loads(tmp_path, capsys, flags, message):
    code = cli.main(["eval", "--benchmark", "cmexam", "--data", "q.csv", *flags, "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_max_new_tokens_must_be_positive_and_the_help_shows_defaults(capsys):
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            cli.main(["eval", "--benchmark", "cmexam", "--max-new-tokens", bad])
        assert "--max-new-tokens: expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 32, or 1024 with --enable-thinking" in text and "--chat-template" in text


# A Qwen3-style template (written for this test): `enable_thinking` false writes an empty think block into the
# generation prompt; `open_thinking` makes it open the block instead, as some reasoning models' templates do.
QWEN3_STYLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% elif open_thinking is defined and open_thinking %}<think>\n{% endif %}{% endif %}"
)


@needs_qwen2
@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_chat_template_of_the_real_qwen2_tokenizer(qwen2_tokenizer, mode):
    assert qwen2_tokenizer.chat_template  # the shipped Qwen2 template
    replies = {item.question: item.answer for item in ITEMS}
    model = ScriptedLM(qwen2_tokenizer, replies, prompt_end="<|im_end|>\n<|im_start|>assistant\n")
    records = evaluate(model, qwen2_tokenizer, "cmexam", ITEMS, mode=mode, batch_size=2, chat_template=True,
                       progress=False)
    assert [r["prediction"] for r in records] == [item.answer for item in ITEMS]
    assert qwen2_tokenizer.padding_side == "left"  # as it came
    plain = evaluate(model, qwen2_tokenizer, "cmexam", ITEMS, mode=mode, batch_size=2, progress=False)
    assert not any(r["correct"] for r in plain)  # the plain prompt never reaches the assistant turn


@needs_qwen2
def test_qwen3_style_template_with_thinking_off_scores_logits_after_the_empty_think_block(qwen2_tokenizer):
    tokenizer = copy.deepcopy(qwen2_tokenizer)
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    prompt = chat_prompt(tokenizer, build_prompt("cmexam", ITEMS[0]))
    assert prompt.endswith("答案：<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    model = ScriptedLM(tokenizer, {item.question: item.answer for item in ITEMS},
                       prompt_end="<|im_start|>assistant\n<think>\n\n</think>\n\n")
    records = evaluate(model, tokenizer, "cmexam", ITEMS, mode="logits", batch_size=3, chat_template=True,
                       progress=False)
    assert [r["prediction"] for r in records] == [item.answer for item in ITEMS]
    thinking = evaluate(model, tokenizer, "cmexam", ITEMS, mode="logits", batch_size=3, chat_template=True,
                        enable_thinking=True, progress=False)
    assert not any(r["correct"] for r in thinking)  # no empty block: the scripted prompt end is not there


@needs_qwen2
def test_qwen3_style_template_with_thinking_on_generates_through_the_reasoning(qwen2_tokenizer):
    tokenizer = copy.deepcopy(qwen2_tokenizer)
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    model = ScriptedLM(tokenizer, THINKING_REPLIES, prompt_end="<|im_start|>assistant\n")
    records = evaluate(model, tokenizer, "cmexam", ITEMS, mode="generate", batch_size=4, max_new_tokens=64,
                       chat_template=True, enable_thinking=True, progress=False)
    assert [r["prediction"] for r in records] == ["B", "B", "C", "D"]
    assert [r["output"] for r in records] == [THINKING_REPLIES[item.question] for item in ITEMS]


@needs_qwen2
def test_a_template_that_opens_the_think_block_in_the_prompt(qwen2_tokenizer, monkeypatch):
    tokenizer = copy.deepcopy(qwen2_tokenizer)
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE.replace("open_thinking is defined and open_thinking",
                                                           "enable_thinking")
    replies = {ITEMS[0].question: "也许选C？不对。\n</think>\n\nB", ITEMS[1].question: "先排除A：腰痛不典型，选"}
    model = ScriptedLM(tokenizer, replies, prompt_end="<|im_start|>assistant\n<think>\n")
    with pytest.warns(UserWarning, match="unterminated <think>"):
        records = evaluate(model, tokenizer, "cmexam", ITEMS[:2], mode="generate", max_new_tokens=32,
                           chat_template=True, enable_thinking=True, progress=False)
    assert [r["prediction"] for r in records] == ["B", ""]  # the second never closed the block it was in
    assert [r["finish_reason"] for r in records] == ["stop", "stop"]


@needs_qwen2
@pytest.mark.filterwarnings("ignore:score:UserWarning")  # a random tiny model may generate no letter at all
def test_eval_command_generates_with_a_chat_template_end_to_end(tmp_path, capsys):
    (tmp_path / "q.csv").write_text('Question,Options,Answer\n缺铁性贫血的首选检查是,"A 铁蛋白\nB 胃镜",A\n'
                                    '属于生命体征的是,"A 血型\nB 体温",B\n', encoding="utf-8")
    out = tmp_path / "out"
    assert cli.main(["eval", "--benchmark", "cmexam", "--data", str(tmp_path / "q.csv"), "--model", "tiny",
                     "--tokenizer", str(QWEN2_TOKENIZER), "--chat-template", "--mode", "generate",
                     "--max-new-tokens", "3", "--output-dir", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["method"] == "generate" and r["finish_reason"] in ("stop", "length")
                                     for r in records)
    assert all(isinstance(r["output"], str) and r["prediction"] == extract_answer(r["output"], "AB") for r in records)
    assert "chat template" in (out / "report.md").read_text()


def test_scoring_a_predictions_file_of_raw_thinking_outputs():
    items = [MCQ(str(n), "q", {"A": "a", "B": "b", "C": "c"}, "B", "s") for n in range(3)]
    predictions = {"0": "<think>选A？不对。</think>\n\nB", "1": "<think>\n选B吧", "2": "B"}
    with pytest.warns(UserWarning, match=r"1 prediction\(s\) hold no answer letter"):
        result = score("cmexam", items, predictions)
    assert (result["correct"], result["no_answer"]) == (2, 1)  # the unterminated one is no answer, not a lucky B


def test_long_prompts_lose_their_beginning_not_their_end(small_tokenizer):
    item = ITEMS[1]
    length = len(small_tokenizer(build_prompt("cmexam", item), add_special_tokens=False)["input_ids"])
    model = ScriptedLM(small_tokenizer, {item.question: "B"})
    model.config = SimpleNamespace(max_position_embeddings=length - 5 + 8)  # 8 new tokens: 5 prompt tokens too many
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) were longer than the model's positions allow"):
        (record,) = evaluate(model, small_tokenizer, "cmexam", [item], mode="generate", max_new_tokens=8,
                             progress=False)
    assert record["prediction"] == "B" and record["finish_reason"] == "stop"  # the question and "答案：" are kept
    assert len(model.seen_prompt) == length - 5
