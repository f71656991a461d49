"""Record formats, detected per record, and the one form they are all read into: a `Conversation`, a list of
messages (role system, user or assistant) in which the assistant turns are what the loss learns.

- instruction (this project's): `instruction`, `response`; optional `input`, `system`, `history`
- Alpaca: `instruction`, `output`; optional `input` (joined to the instruction by a newline), `system`, `history`
  (earlier turns: [[question, answer], ...])
- multiple choice (this project's): `question`, `options` (a list, or letter -> text), `answer` (a letter)
- ShareGPT: `conversations`: [{"from": "human" | "gpt" | "system", "value": ...}] (role/content entries too);
  optional `system`
- TRL / OpenAI messages: `messages`: [{"role": "system" | "user" | "assistant", "content": ...}]; content may be a
  list of text parts; an assistant message with `"weight": 0` is not learnt
- TRL prompt-completion: `prompt`, `completion`: strings, or lists of messages (TRL's conversational form)

Every assistant turn is learnt (multi-turn conversations train on each), except in prompt-completion records, where
only the completion is (as in TRL), and OpenAI's weight-0 turns. String prompt-completion records and multiple-choice
records carry their own answer cue, so plain rendering writes their prompt as it is (`Conversation.verbatim_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
FORMAT_KEYS = {  # the key that names a format; a record must hold exactly one of them
    "messages": "messages", "conversations": "sharegpt", "prompt": "prompt-completion", "completion":
    "prompt-completion", "instruction": "instruction", "question": "multiple-choice"}
EXPECTED = ("a record needs 'messages' (TRL/OpenAI), 'conversations' (ShareGPT), 'prompt'+'completion' (TRL), "
            "'instruction'+'output' (Alpaca) or 'instruction'+'response', or 'question'+'options'+'answer'")


class DataError(ValueError):
    """A record or data file that cannot be read, said in one line naming the file and line."""


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant
    content: str
    trained: bool = False  # an assistant turn that the loss learns


@dataclass(frozen=True)
class Conversation:
    """A record in the one form every format is read into."""

    messages: tuple[Message, ...]
    verbatim_prompt: bool = False  # plain rendering writes the user turns as they are, with no 问题：/回答： cue

    def as_chat(self) -> list[dict]:
        """The messages as a chat template takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def json_kind(value) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def normalize_options(options) -> dict[str, str]:
    if isinstance(options, list):
        if len(options) > len(LETTERS):
            raise DataError(f"options: {len(options)} given, at most {len(LETTERS)} ({LETTERS[0]}-{LETTERS[-1]})")
        options = dict(zip(LETTERS, options))
    if not isinstance(options, dict) or not options or not all(isinstance(v, str) for v in options.values()):
        raise DataError(f"options must be a non-empty list or letter->text mapping of strings, got {options!r}")
    normalized = {str(k).strip().upper(): v for k, v in options.items()}
    if len(normalized) != len(options):  # "a" and "A" would silently become one option
        raise DataError(f"options name the same letter twice (letters are case-insensitive): {sorted(options)}")
    return normalized


def multiple_choice_prompt(question: str, options) -> str:
    lines = [f"以下是单项选择题，请选出正确答案。\n{question}"]
    lines += [f"{letter}. {text}" for letter, text in normalize_options(options).items()]
    return "\n".join(lines) + "\n答案："


def record_format(record: dict) -> str:
    """The format of a record (a key of the table above), from the keys it holds."""
    found = sorted({FORMAT_KEYS[key] for key in record if key in FORMAT_KEYS})
    if not found:
        raise DataError(f"{EXPECTED}; got keys {sorted(record)}")
    if len(found) > 1:
        raise DataError(f"the record holds the keys of more than one format ({', '.join(found)}): got keys "
                        f"{sorted(record)}")
    return found[0]


def to_conversation(record) -> Conversation:
    """The record, of any format above, as a checked Conversation; DataError (without the file and line, which
    the reader adds) when it is not one."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object (one record a line), got {json_kind(record)}")
    kind = record_format(record)
    if kind == "messages":
        return _checked(_message_list(record["messages"], "messages"))
    if kind == "sharegpt":
        return _checked(_system(record) + _message_list(record["conversations"], "conversations"))
    if kind == "prompt-completion":
        return _prompt_completion(record)
    if kind == "instruction":
        return _instruction(record)
    return _multiple_choice(record)


def _checked(messages: list[Message], verbatim_prompt: bool = False) -> Conversation:
    roles = [m.role for m in messages]
    if not any(m.trained for m in messages):
        raise DataError("the conversation has no assistant turn to learn from")
    if "user" not in roles or roles.index("user") > roles.index("assistant"):
        raise DataError("the conversation opens with an assistant turn: an answer needs a user turn before it")
    if roles[-1] != "assistant":
        raise DataError(f"the conversation ends with a {roles[-1]} message after the last assistant turn: nothing "
                        "would learn from it")
    return Conversation(tuple(messages), verbatim_prompt)


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {json_kind(value)}")
    return value


def _optional_string(record: dict, key: str) -> str:
    return "" if record.get(key) is None else _string(record[key], f"'{key}'")


def _system(record: dict) -> list[Message]:
    system = _optional_string(record, "system")
    return [Message("system", system)] if system else []


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                shown = part.get("type") if isinstance(part, dict) else json_kind(part)
                raise DataError(f"{where}: only text content parts are supported, got a {shown!r} part")
            parts.append(part["text"])
        return "".join(parts)
    return _string(value, f"{where} content")


def _message_list(value, key: str, *, learn: bool = True) -> list[Message]:
    """`messages` (role/content) or ShareGPT `conversations` (from/value) entries as Messages; assistant turns
    are learnt when `learn`, unless an OpenAI-style weight of 0 says otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"'{key}' must be a non-empty list of messages, got {json_kind(value)}")
    messages = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if isinstance(entry, dict) and "from" in entry:
            role = SHAREGPT_ROLES.get(entry["from"]) if isinstance(entry["from"], str) else None
            if role is None:
                raise DataError(f"{where}: 'from' must be human, gpt or system (or user, assistant), got "
                                f"{entry['from']!r}")
            content = _content(entry.get("value"), where)
        elif isinstance(entry, dict) and "role" in entry:
            role = entry["role"]
            if role not in ROLES:
                raise DataError(f"{where}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
            for unsupported in ("tool_calls", "reasoning_content"):
                if entry.get(unsupported):
                    raise DataError(f"{where}: '{unsupported}' is not supported (text turns only; reasoning goes in "
                                    "the content as <think>...</think>)")
            content = _content(entry.get("content"), where)
        else:
            got = f"keys {sorted(entry)}" if isinstance(entry, dict) else json_kind(entry)
            raise DataError(f"{where}: a message needs 'role'+'content' (or ShareGPT's 'from'+'value'), got {got}")
        weight = entry.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DataError(f"{where}: 'weight' must be 0 or 1, got {weight!r}")
        messages.append(Message(role, content, trained=learn and role == "assistant" and weight == 1))
    return messages


def _prompt_completion(record: dict) -> Conversation:
    if "prompt" not in record or "completion" not in record:
        raise DataError(f"a prompt-completion record needs both 'prompt' and 'completion', got keys {sorted(record)}")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str):
        head = [Message("user", prompt)]
    elif isinstance(prompt, list):
        head = _message_list(prompt, "prompt", learn=False)  # TRL learns the completion only
    else:
        raise DataError(f"'prompt' must be a string or a list of messages, got {json_kind(prompt)}")
    if isinstance(completion, str):
        tail = [Message("assistant", completion, trained=True)]
    elif isinstance(completion, list):
        tail = _message_list(completion, "completion")
        if any(m.role != "assistant" for m in tail):
            raise DataError("'completion' messages must all be the assistant's, got roles "
                            f"{[m.role for m in tail]}")
    else:
        raise DataError(f"'completion' must be a string or a list of messages, got {json_kind(completion)}")
    return _checked(head + tail, verbatim_prompt=isinstance(prompt, str))


def _instruction(record: dict) -> Conversation:
    answers = [key for key in ("response", "output") if key in record]
    if (not isinstance(record["instruction"], str) or len(answers) != 1
            or not isinstance(record[answers[0]], str)):
        raise DataError("an instruction record needs a string 'instruction' and a string 'response' (or Alpaca's "
                        f"'output'), got keys {sorted(record)}")
    question, extra = record["instruction"], _optional_string(record, "input")
    messages = _system(record)
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(turn, list) and len(turn) == 2
                                                and all(isinstance(t, str) for t in turn) for turn in history):
        raise DataError("'history' must be a list of [question, answer] string pairs")
    for earlier_question, earlier_answer in history:
        messages += [Message("user", earlier_question), Message("assistant", earlier_answer, trained=True)]
    messages += [Message("user", f"{question}\n{extra}" if extra else question),
                 Message("assistant", record[answers[0]], trained=True)]
    return _checked(messages)


def _multiple_choice(record: dict) -> Conversation:
    if not isinstance(record["question"], str):
        raise DataError("a multiple-choice record needs a string 'question'")
    options = normalize_options(record.get("options"))
    answer = str(record.get("answer", "")).strip().upper()
    if answer not in options:
        raise DataError(f"answer {record.get('answer')!r} is not one of the options {list(options)}")
    return _checked([Message("user", multiple_choice_prompt(record["question"], options)),
                     Message("assistant", f"{answer}. {options[answer]}", trained=True)], verbatim_prompt=True)
