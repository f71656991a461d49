"""A Conversation as token ids and labels: the loss learns the assistant turns and nothing else.

Plain rendering (no chat template): `问题：{user}\n` for each user turn, `回答：` before each assistant turn, the
answer, then the tokenizer's eos token (learnt: the model must learn to stop); a system message is written as its
text and a newline; turns after an answer start with a newline. A single-turn record is `问题：…\n回答：` + answer +
eos. Multiple-choice and string prompt-completion records bring their own cue: their prompt is written as it is.

Chat rendering (the tokenizer's chat template): the input ids are the tokenizer's tokens of the whole rendered
conversation (`apply_chat_template(messages, tokenize=True)`). An assistant turn's learnt span starts where the
generation prompt for it ends (`apply_chat_template(messages[:i], add_generation_prompt=True)`, what inference
feeds the model) and ends with the template's end-of-turn token (`<|im_end|>`, learnt); the newline a template
writes after that token is not learnt (generation stops at the token). `enable_thinking` reaches the template:
Qwen3's, with it False, puts an empty `<think>\n\n</think>\n\n` in the generation prompt, so that block is prompt
(not learnt) and answer-only data trains direct answers; with it True the generation prompt ends at
`<|im_start|>assistant\n` and whatever the template writes after it, the `<think>` block included, is learnt.
Templates that rewrite earlier turns once later ones follow (Qwen3 drops their `<think>` blocks) are handled by
finding each turn, as the template renders it last, in the whole conversation (`_aligned_span`).

The spans are checked against the tokens: the ids of the prompt and answer pieces tokenized apart must equal the
tokens of the whole text. Where a BPE merge crosses a boundary they do not; the whole text's tokens are kept, a
token is learnt only if all of its characters are answer text, and the merge is counted (a warning in training).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsedoctor_kernels.train.data.formats import Conversation, DataError

MODES = ("auto", "chat", "plain")
QUESTION_CUE, ANSWER_CUE = "问题：", "回答："
IGNORE = -100


@dataclass(frozen=True)
class Piece:
    """Plain rendering, piece by piece: text (or the eos token) and whether the loss learns it."""

    text: str
    trained: bool
    eos: bool = False


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not learn
    truncated: bool  # max_length cut the end off
    boundary_merges: int = 0  # tokens merged across a prompt/answer boundary, left unlearnt

    @property
    def input_ids_labels(self) -> tuple[list[int], list[int]]:
        return self.input_ids, self.labels


def rendering_mode(tokenizer, chat_template: str = "auto") -> str:
    """'chat' or 'plain': what `chat_template` (auto, chat or plain) means for this tokenizer."""
    if chat_template not in MODES:
        raise DataError(f"--chat-template must be one of {', '.join(MODES)}, got {chat_template!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "chat" and not has_template:
        where = getattr(tokenizer, "name_or_path", "")
        raise DataError(f"--chat-template chat: the tokenizer{f' ({where})' if where else ''} has no chat template "
                        "(tokenizer.chat_template is not set); use --chat-template plain or auto")
    return "chat" if has_template and chat_template != "plain" else "plain"


def plain_pieces(conversation: Conversation) -> list[Piece]:
    pieces, prompt, verbatim = [], "", conversation.verbatim_prompt
    for message in conversation.messages:
        if message.role == "system":
            prompt += message.content + "\n"
        elif message.role == "user":
            prompt += message.content if verbatim else f"{QUESTION_CUE}{message.content}\n"
        else:
            pieces += [Piece(prompt if verbatim else prompt + ANSWER_CUE, False),
                       Piece(message.content, message.trained), Piece("", message.trained, eos=True)]
            prompt = "\n"
    return pieces


def plain_text(conversation: Conversation) -> str:
    """The plain rendering as text, without the eos tokens (what the demo tokenizer is trained on)."""
    return "".join(piece.text for piece in plain_pieces(conversation))


def encode_conversation(conversation: Conversation, tokenizer, max_length: int, mode: str,
                        enable_thinking: bool = False) -> Encoded:
    """The conversation's ids and labels, rendered as `mode` ('chat' or 'plain') says, cut to max_length."""
    if mode == "chat":
        ids, labels, merges = label_spans(tokenizer, *chat_spans(tokenizer, conversation, enable_thinking))
    else:
        (ids, labels), merges = _plain_ids(tokenizer, conversation), 0
    return Encoded(ids[:max_length], labels[:max_length], len(ids) > max_length, merges)


def _plain_ids(tokenizer, conversation: Conversation) -> tuple[list[int], list[int]]:
    """(ids, labels); each piece is tokenized on its own, as the prompt is at inference."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, which plain rendering ends each answer with; set "
                        "tokenizer.eos_token or use its chat template")
    ids, labels = [], []
    for piece in plain_pieces(conversation):
        piece_ids = [tokenizer.eos_token_id] if piece.eos else _tokens(tokenizer, piece.text)
        ids += piece_ids
        labels += piece_ids if piece.trained else [IGNORE] * len(piece_ids)
    return ids, labels


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _special_strings(tokenizer) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials = [token.content for token in added.values() if getattr(token, "special", False)]
    return specials or list(getattr(tokenizer, "all_special_tokens", []))


def chat_spans(tokenizer, conversation: Conversation, enable_thinking: bool = False) -> tuple[str, list]:
    """The whole conversation rendered by the chat template, and the (start, end) character span of each learnt
    assistant turn in it (see the module's docstring)."""
    chat, renders = conversation.as_chat(), {}

    def render(count: int, generation_prompt: bool = False) -> str:
        """The template's text of the first `count` messages (cached: the spans ask for the same prefixes)."""
        key = (count, generation_prompt)
        if key not in renders:
            try:
                renders[key] = tokenizer.apply_chat_template(chat[:count], tokenize=False,
                                                             add_generation_prompt=generation_prompt,
                                                             enable_thinking=enable_thinking)
            except Exception as error:  # noqa: BLE001  (a template raises what it likes: jinja2 errors, ValueError)
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise DataError(f"the chat template cannot render this conversation: {message}") from None
        return renders[key]

    full, specials, spans = render(len(chat)), _special_strings(tokenizer), []
    for index, message in enumerate(conversation.messages):
        if not message.trained:
            continue
        prompt, whole = render(index, True), render(index + 1)
        if not whole.startswith(prompt):
            hint = (" (a <think> block in an answer, with enable_thinking off?)" if "<think>" in message.content
                    else "")
            raise DataError(f"the chat template's generation prompt before the assistant turn at message {index} is "
                            f"not how it renders that turn{hint}; use --chat-template plain")
        end = _end_of_turn(whole, len(prompt), specials)
        if end <= len(prompt):
            raise DataError(f"the chat template renders nothing for the assistant turn at message {index}")
        if full.startswith(whole[:end]):
            span = (len(prompt), end)
        else:  # the template renders this turn differently once later turns follow
            span = _aligned_span(full, whole, len(prompt), end, index, len(chat), render)
        if spans and span[0] < spans[-1][1] or span[0] >= span[1]:
            raise DataError(f"the chat template renders the assistant turn at message {index} out of order; use "
                            "--chat-template plain")
        spans.append(span)
    return full, spans


def _end_of_turn(whole: str, start: int, specials: list[str]) -> int:
    """Where the learnt part of the turn whole[start:] ends: after its end-of-turn token, before the whitespace
    that a template writes after it."""
    kept = whole[start:].rstrip()
    if start + len(kept) < len(whole) and any(kept.endswith(token) for token in specials):
        return start + len(kept)
    return len(whole)


def _aligned_span(full: str, whole: str, start: int, end: int, index: int, messages: int,
                  render) -> tuple[int, int]:
    """The span in `full` of turn `index`, which `whole` (the conversation up to that turn, rendered with it last)
    renders differently. Compared over the stretch of `full` from the longest render up to an earlier message that
    both texts start with, to the shortest render up to a later message that `full` starts with (so that a later
    turn that reads the same is not taken for this one), one of the turn's two parts must render the same:
    - its prompt: the template left text out of the answer (Qwen3 with thinking on: the history has no <think>
      block), so the answer in `full` is a suffix of the answer in `whole`;
    - its answer: the template left text out of the prompt (Qwen3 with thinking off: no empty <think> block)."""
    base = next((len(render(count)) for count in range(index, 0, -1) if len(render(count)) <= start
                 and full.startswith(render(count)) and whole.startswith(render(count))), 0)
    stop = next((len(render(count)) for count in range(index + 2, messages)
                 if len(render(count)) > base and full.startswith(render(count))), len(full))
    prompt, answer, stretch = whole[base:start], whole[start:end], full[base:stop]
    if stretch.startswith(prompt):
        # the first end of a suffix of the answer (it ends with the end-of-turn token: the turn's own comes first)
        position = len(prompt)
        while (position := stretch.find(answer[-1], position)) >= 0:
            position += 1
            if answer.endswith(stretch[len(prompt):position]):
                return base + len(prompt), base + position
    elif (found := stretch.find(answer)) >= 0:
        return base + found, base + found + len(answer)
    raise DataError(f"the chat template renders the assistant turn at message {index} so differently once later turns "
                    "follow (in both its prompt and its answer) that its span cannot be found; use --chat-template "
                    "plain")


def label_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], int]:
    """(ids, labels, boundary merges): the tokens of `text`, learnt inside `spans` (see the module's docstring)."""
    full_ids = _tokens(tokenizer, text)
    cuts = [0] + [cut for span in spans for cut in span] + [len(text)]
    ids, labels = [], []
    for number, (start, end) in enumerate(zip(cuts, cuts[1:])):
        piece = _tokens(tokenizer, text[start:end])
        ids += piece
        labels += piece if number % 2 else [IGNORE] * len(piece)
    if ids == full_ids:
        return ids, labels, 0
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return ids, labels, 1  # no offsets (a tokenizer without a fast backend): keep the pieces' tokens
    boundaries = cuts[1:-1]
    labels = [token if end > start and any(s <= start and end <= e for s, e in spans) else IGNORE
              for token, (start, end) in zip(full_ids, offsets)]
    merges = sum(1 for start, end in offsets if any(start < cut < end for cut in boundaries))
    return full_ids, labels, merges
