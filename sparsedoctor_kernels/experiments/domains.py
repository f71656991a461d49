"""Multi-domain instruction records with a `domain` field, for measuring whether LoRA experts specialise.

Every record is an instruction record ({"instruction", "response"}) plus "domain" (the domain's name), which
`format_example` ignores: the records train through the ordinary data path unchanged, and the field is there for
the analysis (`split_records`, `domain_index`, `sparsedoctor_kernels.train.specialisation`).

Two tasks:

`synthetic_domain_records` -- D domains (at most 10) over one shared vocabulary of ASCII pseudo-words (one
BPE token each once the tokenizer has merged them). Each domain is a first-order Markov chain with its own
successor table: every word has `branching` likely successors per domain (weights b, b-1, ..., 1), drawn
separately for each domain, plus `smoothing` mass spread over all words. The instruction carries a domain tag
(`tag_in_prompt`) and a few words of the chain; the response continues the chain. The domain signal, from
coarse to fine:
  - the tag, a few tokens before the response (reachable through attention only);
  - word frequencies: each domain owns a block of ~V/D words, and a successor is drawn from the own block with
    probability `home_bias` (otherwise from the whole vocabulary), so the current word alone tells the domain
    better than chance when `home_bias` > 0 -- a router that reads only the current token can use this;
  - transitions: the same word has different successors in different domains, so every pair of consecutive
    words is evidence (a per-domain bigram model classifies a 16-word response almost perfectly).
Why one shared adapter cannot do it trivially: the domains disagree about the next word. Knowing the domain,
the next word costs H(b, b-1, ..., 1) plus the smoothing (1.16 nats with the defaults); seeing only the
current word, the posterior mixture of D tables (1.85 nats with the defaults, 2.24 with home_bias=0;
`MarkovDomains.optimal_loss_nats` computes both floors). Reaching the lower floor means storing D conflicting
tables and switching between them by context, which is what routing a domain's tokens to its own experts buys.
It can show whether routers pick up a domain signal (MI between domain and top-1 expert), whether they use
context beyond the current token (the MI given the token), and whether that helps the LM loss. It cannot show
anything about language, knowledge or medical content: the chains are synthetic.

`pretraining_texts` samples the domain-averaged chain (the mean of the D successor tables, no tags): text for
briefly pretraining a tiny base so that the adapters start from a model that knows the shared statistics and
only the domain-specific corrections are left to them, as with a real pretrained base. Pass it the same chain
arguments (num_domains, vocab_size, seed, branching, home_bias, smoothing) as the records.

`department_records` -- the bundled Chinese medical demo set (`demo_records`) with `domain` = the department of
the condition each record is about (from `facts.FACTS`; 19 departments, 1-5 conditions each). Real text, but
tiny: a department's records are a handful of conditions in six fixed phrasings, and each condition's name
belongs to one department only, so the domain is largely readable from single tokens (compare the MI given the
token). An eval split from `split_records` holds out phrasings of facts seen in training, so its loss measures
recall rather than generalisation. It can show specialisation on natural text; it cannot show whether that
specialisation carries over to unseen conditions or to real medical corpora.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from sparsedoctor_kernels.train.data import DataError, demo_records, format_example
from sparsedoctor_kernels.train.data.facts import FACTS

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
MAX_WORDS = (len(CONSONANTS) * len(VOWELS)) ** 2
# Word k is combination k * WORD_STRIDE (mod MAX_WORDS) of the CVCV grid: coprime with MAX_WORDS, so the words are
# distinct, and large, so that neighbours differ in every letter rather than all starting "ba".
WORD_STRIDE = 2053
# Domain names: the heavenly stems, one Chinese character each (so at most 10 domains).
DOMAIN_NAMES = "甲乙丙丁戊己庚辛壬癸"
BURN_IN = 8  # steps before a record's first word, so that it starts near the domain's stationary distribution


def pseudo_words(count: int) -> list[str]:
    """`count` distinct consonant-vowel-consonant-vowel words ("baba", "luko", "tore", ...). They depend on `count`
    only, never on a seed: every seed shares one vocabulary."""
    if not isinstance(count, int) or isinstance(count, bool) or not 2 <= count <= MAX_WORDS:
        raise ValueError(f"vocab_size must be an integer in [2, {MAX_WORDS}], got {count!r}")
    grid = list(itertools.product(CONSONANTS, VOWELS, CONSONANTS, VOWELS))
    return ["".join(grid[k * WORD_STRIDE % MAX_WORDS]) for k in range(count)]


@dataclass(frozen=True)
class MarkovDomains:
    """The chains behind `synthetic_domain_records`: `transitions[d][w][v]` = P(next word v | word w, domain d)."""

    names: tuple[str, ...]
    words: tuple[str, ...]
    home_blocks: tuple[tuple[int, ...], ...]  # the word ids each domain's successors favour
    transitions: tuple[tuple[tuple[float, ...], ...], ...]

    def averaged(self) -> tuple[tuple[float, ...], ...]:
        """The domain-averaged successor table (what `pretraining_texts` samples)."""
        count = len(self.names)
        return tuple(tuple(sum(table[w][v] for table in self.transitions) / count for v in range(len(self.words)))
                     for w in range(len(self.words)))

    def stationary(self, table) -> list[float]:
        """The stationary distribution of a successor table (power iteration; smoothing makes it unique)."""
        size = len(self.words)
        dist = [1.0 / size] * size
        for _ in range(500):
            new = [0.0] * size
            for w, p in enumerate(dist):
                row = table[w]
                for v in range(size):
                    new[v] += p * row[v]
            converged = max(abs(a - b) for a, b in zip(new, dist)) < 1e-12
            dist = new
            if converged:
                break
        return dist

    def optimal_loss_nats(self) -> dict[str, float]:
        """Expected next-word cross-entropy (nats) on records drawn uniformly over domains, for a predictor
        that knows the domain ("knowing_domain") and for the best one that sees only the current word
        ("current_word_only": the posterior mixture of the domains' tables). Per word, at the stationary
        distributions; a model's per-token loss also includes the eos token and the first response word."""
        count, size = len(self.names), len(self.words)
        stationary = [self.stationary(table) for table in self.transitions]
        knowing = sum(stationary[d][w] * _entropy(self.transitions[d][w])
                      for d in range(count) for w in range(size)) / count
        blind = 0.0
        for w in range(size):
            weights = [stationary[d][w] / count for d in range(count)]
            mass = sum(weights)
            mixture = [sum(weights[d] * self.transitions[d][w][v] for d in range(count)) / mass
                       for v in range(size)]
            blind += mass * _entropy(mixture)
        return {"knowing_domain": knowing, "current_word_only": blind}


def _entropy(dist) -> float:
    return -sum(p * math.log(p) for p in dist if p > 0)


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _check_fraction(name: str, value, *, closed_top: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or value > 1 or (value == 1 and not closed_top):
        raise ValueError(f"{name} must be a number in [0, {'1]' if closed_top else '1)'}, got {value!r}")


def markov_domains(num_domains: int = 4, vocab_size: int = 48, seed: int = 0, *, branching: int = 3,
                   home_bias: float = 0.5, smoothing: float = 0.02) -> MarkovDomains:
    """The domains' successor tables, deterministic by `seed` (see the module docstring for their design)."""
    _check_int("num_domains", num_domains, 2, len(DOMAIN_NAMES))
    words = pseudo_words(vocab_size)
    if vocab_size < 2 * num_domains:
        raise ValueError(f"vocab_size {vocab_size} gives fewer than 2 words per domain block "
                         f"({num_domains} domains); use vocab_size >= {2 * num_domains}")
    _check_int("branching", branching, 1, vocab_size // num_domains)  # distinct successors within one block
    _check_fraction("home_bias", home_bias, closed_top=True)
    _check_fraction("smoothing", smoothing, closed_top=False)
    rng = random.Random(f"{seed}:chain")  # a string seed: the chain does not depend on how many records follow
    order = list(range(vocab_size))
    rng.shuffle(order)
    blocks = tuple(tuple(sorted(order[d::num_domains])) for d in range(num_domains))
    branch_weights = [(branching - j) / (branching * (branching + 1) / 2) for j in range(branching)]
    tables = []
    for block in blocks:
        table = []
        for _ in range(vocab_size):
            successors: list[int] = []
            while len(successors) < branching:
                pool = block if rng.random() < home_bias else range(vocab_size)
                candidate = rng.choice(pool)
                if candidate not in successors:
                    successors.append(candidate)
            row = [smoothing / vocab_size] * vocab_size
            for successor, weight in zip(successors, branch_weights):
                row[successor] += (1 - smoothing) * weight
            table.append(tuple(row))
        tables.append(tuple(table))
    return MarkovDomains(tuple(DOMAIN_NAMES[:num_domains]), tuple(words), blocks, tuple(tables))


def _walk(rng: random.Random, table, start: int, steps: int) -> list[int]:
    ids, word = [], start
    population = range(len(table))
    for _ in range(steps):
        word = rng.choices(population, weights=table[word])[0]
        ids.append(word)
    return ids


def synthetic_domain_records(num_domains: int = 4, records_per_domain: int = 250, vocab_size: int = 48,
                             seed: int = 0, *, prompt_words: int = 4, response_words: int = 16,
                             tag_in_prompt: bool = True, branching: int = 3, home_bias: float = 0.5,
                             smoothing: float = 0.02) -> list[dict]:
    """`records_per_domain` records per domain, interleaved (domain 0, 1, ..., 0, 1, ...), deterministic by
    `seed`: {"instruction": "【甲】续写：w1 w2 w3 w4", "response": "w5 ... w20", "domain": "甲"}. The response
    continues the instruction's chain; `tag_in_prompt=False` drops the tag (then only statistics tell the
    domain)."""
    _check_int("records_per_domain", records_per_domain, 1)
    _check_int("prompt_words", prompt_words, 1)
    _check_int("response_words", response_words, 1)
    domains = markov_domains(num_domains, vocab_size, seed, branching=branching, home_bias=home_bias,
                             smoothing=smoothing)
    rng = random.Random(f"{seed}:records")
    words = domains.words
    records = []
    for _ in range(records_per_domain):
        for name, table in zip(domains.names, domains.transitions):
            walk = _walk(rng, table, rng.randrange(vocab_size), BURN_IN + prompt_words + response_words)[BURN_IN:]
            tag = f"【{name}】" if tag_in_prompt else ""
            records.append({"instruction": f"{tag}续写：" + " ".join(words[i] for i in walk[:prompt_words]),
                            "response": " ".join(words[i] for i in walk[prompt_words:]), "domain": name})
    return records


def pretraining_texts(num_texts: int = 2000, words_per_text: int = 24, num_domains: int = 4, vocab_size: int = 48,
                      seed: int = 0, *, branching: int = 3, home_bias: float = 0.5,
                      smoothing: float = 0.02) -> list[str]:
    """`num_texts` space-separated word sequences from the domain-averaged chain (no tags, no prompt), for
    pretraining a tiny base. Same chain arguments as `synthetic_domain_records`, same chain."""
    _check_int("num_texts", num_texts, 1)
    _check_int("words_per_text", words_per_text, 1)
    domains = markov_domains(num_domains, vocab_size, seed, branching=branching, home_bias=home_bias,
                             smoothing=smoothing)
    table = domains.averaged()
    rng = random.Random(f"{seed}:pretraining")
    return [" ".join(domains.words[i] for i in _walk(rng, table, rng.randrange(vocab_size),
                                                      BURN_IN + words_per_text)[BURN_IN:])
            for _ in range(num_texts)]


# --- the demo set by department -------------------------------------------------------------------------------

def _condition_of(record: dict) -> int:
    """The FACTS row a demo record is about: the one whose presentation it quotes, else the one with the longest
    name it mentions (outside the distractor options). Raises when none is, so a change to the demo set that
    breaks this mapping fails loudly instead of mislabelling records."""
    _, response = format_example(record)  # a multiple-choice response is the answer with its text
    text = record.get("instruction", record.get("question", "")) + response
    quoted = [i for i, fact in enumerate(FACTS) if fact[2] in text]
    if len(quoted) == 1:
        return quoted[0]
    named = [i for i, fact in enumerate(FACTS) if fact[0] in text]
    if not named:
        raise DataError(f"no condition of facts.FACTS is named in the demo record {record!r}")
    longest = max(len(FACTS[i][0]) for i in named)
    best = [i for i in named if len(FACTS[i][0]) == longest]
    if len(best) != 1:
        raise DataError(f"the demo record {record!r} names several conditions equally: "
                        f"{[FACTS[i][0] for i in best]}")
    return best[0]


def departments() -> dict[str, int]:
    """Department -> number of conditions in facts.FACTS, in order of first appearance."""
    counts: dict[str, int] = {}
    for fact in FACTS:
        counts[fact[1]] = counts.get(fact[1], 0) + 1
    return counts


def department_records(seed: int = 0, keep: list[str] | None = None) -> list[dict]:
    """`demo_records(seed)` with "domain" = the department of each record's condition; `keep` restricts them to
    the departments it names (e.g. the four largest: 心内科, 呼吸科, 内分泌科, 神经内科)."""
    known = departments()
    if keep is not None:
        unknown = [name for name in keep if name not in known]
        if unknown:
            raise ValueError(f"keep names departments that facts.FACTS does not have: {unknown}; "
                             f"known: {list(known)}")
    records = [{**record, "domain": FACTS[_condition_of(record)][1]} for record in demo_records(seed)]
    return records if keep is None else [r for r in records if r["domain"] in keep]


# --- splitting and indexing by domain -------------------------------------------------------------------------

def _domain_of(record, position: int) -> str:
    domain = record.get("domain") if isinstance(record, dict) else None
    if not isinstance(domain, str):
        raise DataError(f"record {position} has no string 'domain' field (keys: "
                        f"{sorted(record) if isinstance(record, dict) else type(record).__name__})")
    return domain


def domain_index(records: list[dict]) -> dict[str, int]:
    """Domain name -> integer id, in order of first appearance (the labels `specialisation` counts)."""
    index: dict[str, int] = {}
    for position, record in enumerate(records):
        index.setdefault(_domain_of(record, position), len(index))
    return index


def split_records(records: list[dict], eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval), stratified by domain: each domain with n >= 2 records gives round(n * eval_fraction) of
    them, at least 1 and at most n - 1, chosen at random by `seed`, to eval; a domain with one record keeps it
    for training. Both lists keep the records' original order; together they are exactly `records`."""
    _check_fraction("eval_fraction", eval_fraction, closed_top=False)
    if eval_fraction == 0:
        raise ValueError("eval_fraction must be > 0 (an empty eval split measures nothing)")
    by_domain: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        by_domain.setdefault(_domain_of(record, position), []).append(position)
    rng = random.Random(f"{seed}:split")
    held_out: set[int] = set()
    for positions in by_domain.values():
        if len(positions) < 2:
            continue
        count = min(len(positions) - 1, max(1, round(len(positions) * eval_fraction)))
        held_out.update(rng.sample(positions, count))
    train = [r for i, r in enumerate(records) if i not in held_out]
    evaluation = [r for i, r in enumerate(records) if i in held_out]
    return train, evaluation
