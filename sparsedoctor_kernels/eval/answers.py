"""The one answer extractor, for generated text and for prediction files alike, in the way evaluation harnesses
(lm-evaluation-harness, OpenCompass, CMB's and CMExam's scripts) read answers: an explicit answer cue first
("答案：B", "正确答案为 A、C", "选B", "The answer is (C)", "Answer: B"), then the first standalone option letters
(a single capital letter that is no part of a word, abbreviation or code: "B. 皮肤" -> "B", "A、C、D" -> "ACD",
but "A patient", "Hepatitis B virus", "ECG", "BCG", "CD4", "维生素B12" give nothing). Only the item's option
letters count; "" when the text holds no answer.

A thinking model's reasoning is no answer: a complete `<think>...</think>` block is dropped first, and text whose
`<think>` never closes (the generation budget ran out mid-reasoning) holds no answer at all, rather than a
letter guessed from half-finished reasoning ("选A吗？不对……")."""

from __future__ import annotations

import re
import unicodedata

# Used when an item's options are unknown (CMB's answer key carries no options; its answers go up to F).
DEFAULT_OPTION_LETTERS = "ABCDEFGH"

# Characters that may stand between the letters of one answer ("A、C", "A, C", "(A)(C)", "**B**", "A和C").
_JOINERS = frozenset(" \t\r\n,;/&+|()[]{}<>'\"*、，；“”‘’「」『』【】《》和与及")
_PIECE = re.compile(r"[A-Za-z]+|.", re.S)
_LATIN_RUN = re.compile(r"[A-Za-z]+")
# Text that is letters and punctuation only: a bare answer ("b", "dca", "a, c", '["B"]', "(D)").
# Runs must be separated (never `(?:[A-Za-z]+[^\w]*)+`, which backtracks exponentially on long words).
_BARE = re.compile(r"[^\w]*[A-Za-z]+(?:[^\w]+[A-Za-z]+)*[^\w]*")

# (cue, whether lower-case letters count after it). In priority order. After English "answer is" a lower-case
# "a" is the article ("the answer is a rash"), so only capitals count there; after a colon or a Chinese cue
# any case does.
_CUES = (
    (re.compile(r"答案\s*(?:应该|应当|应|可能)?\s*(?:是|为|选择|选)?\s*(?:选项)?\s*:?"), True),
    (re.compile(r"正确的?(?:选项|答案)?\s*(?:是|为)\s*:?"), True),  # "正确的是C", "正确选项为C"
    (re.compile(r"(?i:\banswer\b['\"]?\s*[:=])"), True),
    (re.compile(r"(?i:\banswer\b\s*(?:is|would be|should be)?\s*:?\s*(?:option\b)?)"), False),
    (re.compile(r"选择?(?!项)\s*:?"), True),  # "选B", "故选A", "应选择C"; not "选项B是错的"
)


def normalize_letters(text: str) -> str:
    """Canonical form of an already-extracted letter set: 'dca' -> 'ACD' (upper-case, sorted, de-duplicated;
    Latin letters only, so full-width 'Ｂ' is 'B' and Chinese characters never count as letters)."""
    text = unicodedata.normalize("NFKC", str(text)).upper()
    return "".join(sorted({c for c in text if "A" <= c <= "Z"}))


def _option_letters(piece: str, valid: str, any_case: bool) -> str:
    """The letters of a Latin run that names options ('B', 'ACD'), or '' for a word ('DNA', 'Correct')."""
    if not piece.isascii() or not piece.isalpha() or not (any_case or piece.isupper()):
        return ""
    letters = piece.upper()
    if len(set(letters)) != len(letters) or not set(letters) <= set(valid):
        return ""
    return letters


def _letter_group(text: str, start: int, valid: str, any_case: bool) -> str:
    """The option letters from `start` on, up to the first character or word that is not a joiner."""
    letters = ""
    for match in _PIECE.finditer(text, start):
        piece = match.group()
        if piece in _JOINERS or (letters and piece.lower() == "and"):
            continue
        found = _option_letters(piece, valid, any_case)
        if not found:
            break
        letters += found
    return normalize_letters(letters)

# After a standalone letter, the lower-case words that still let it be an answer ("I think B is right",
# "A and C are correct"); any other lower-case word makes it an article or a name ("A patient", "Hepatitis B
# virus").
_ANSWER_VERBS = frozenset({"is", "are", "was", "were", "seems", "seem", "looks", "appears", "should", "would"})
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
_SPACE = re.compile(r"\s+")
_CONNECTORS = "-'’_"  # "B-cell", "B's", "T_1": the letter belongs to a longer token


def _standalone_letter(text: str, match: re.Match, valid: str) -> str:
    """The letter of a Latin run that names one option on its own, without an answer cue: one capital letter
    of `valid`, not touching a digit or a hyphen-joined token and not followed by an ordinary lower-case
    word; '' otherwise (multi-letter runs such as 'ECG', 'BCG', 'CD' are abbreviations, never answers here)."""
    letter, start, end = match.group(), match.start(), match.end()
    if len(letter) != 1 or not letter.isupper() or letter not in valid:
        return ""
    before, after = text[start - 1: start], text[end: end + 1]
    if after.isdigit() or before.isdigit() or (after and after in _CONNECTORS and text[end + 1: end + 2].isalnum()):
        return ""
    if before and before in _CONNECTORS and text[start - 2: start - 1].isalnum():
        return ""
    word = _NEXT_WORD.match(text, end)
    if word and word.group(1) not in _ANSWER_VERBS:
        if word.group(1) != "and":
            return ""
        space = _SPACE.match(text, word.end())  # "A and C": only when a standalone letter follows
        following = _LATIN_RUN.match(text, space.end()) if space else None
        if following is None or not _standalone_letter(text, following, valid):
            return ""
    return letter


def _standalone_group(text: str, first: re.Match, valid: str) -> str:
    """The standalone letters from `first` on, separated by joiners ("A、C、D", "A, C", "A和C", "A and C")."""
    letters = ""
    for match in _PIECE.finditer(text, first.start()):
        piece = match.group()
        if piece in _JOINERS or (letters and piece == "and"):
            continue
        found = _standalone_letter(text, match, valid) if piece.isascii() and piece.isalpha() else ""
        if not found:
            break
        letters += found
    return normalize_letters(letters)


def _bare_answer(text: str, valid: str) -> str | None:
    """The letters of a text that is nothing but option letters and punctuation, in any case; None otherwise."""
    if not _BARE.fullmatch(text):
        return None
    runs = [_option_letters(run, valid, any_case=True) for run in _LATIN_RUN.findall(text)]
    return normalize_letters("".join(runs)) if all(runs) else None


THINK_START, THINK_END = "<think>", "</think>"


def opens_thinking(prompt: str) -> bool:
    """Whether `prompt` ends inside a `<think>` block (some chat templates open it in the generation prompt), so
    the generated text starts in the middle of the reasoning."""
    start = prompt.rfind(THINK_START)
    return start >= 0 and prompt.find(THINK_END, start) < 0


def strip_thinking(text: str, in_thinking: bool = False) -> str | None:
    """`text` without its reasoning: what follows the last `</think>`; the text itself when it holds no think
    tags; None when a `<think>` (or the prompt's, `in_thinking`) is never closed, as the answer was never
    reached."""
    end = text.rfind(THINK_END)
    if end >= 0:
        return text[end + len(THINK_END):]
    return None if in_thinking or THINK_START in text else text


def extract_answer(text, valid: str | None = None, *, in_thinking: bool = False) -> str:
    """The answer letters of `text`, canonical ('ACD'), restricted to `valid` (the item's option letters;
    default A-H); '' when there is none. Reasoning is skipped (`strip_thinking`): '' for an unterminated
    `<think>`; `in_thinking` says the text starts inside a block its prompt opened."""
    valid = (valid or DEFAULT_OPTION_LETTERS).upper()
    text = strip_thinking("" if text is None else str(text), in_thinking)
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", text)  # full-width 'Ｂ', '：', '（' to ASCII
    bare = _bare_answer(text, valid)
    if bare is not None:
        return bare
    for cue, any_case in _CUES:
        for match in cue.finditer(text):
            letters = _letter_group(text, match.end(), valid, any_case)
            if letters:
                return letters
    for match in _LATIN_RUN.finditer(text):
        if _standalone_letter(text, match, valid):
            return _standalone_group(text, match, valid)
    return ""
