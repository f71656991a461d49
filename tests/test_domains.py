"""Multi-domain records: the synthetic Markov domains (deterministic, distinguishable, a real gap between knowing
and not knowing the domain), the pretraining texts, the demo set by department, the stratified split, and the
records through the ordinary data path."""

import collections
import math

import pytest

from sparsedoctor_kernels.experiments.domains import (
    DOMAIN_NAMES,
    department_records,
    departments,
    domain_index,
    markov_domains,
    pretraining_texts,
    pseudo_words,
    split_records,
    synthetic_domain_records,
)
from sparsedoctor_kernels.train.data import (
    DataError,
    build_tokenizer,
    corpus,
    demo_records,
    encode,
    format_example,
    load_jsonl,
    write_jsonl,
)
from sparsedoctor_kernels.train.data.facts import FACTS


def response_words(record) -> list[str]:
    return record["response"].split(" ")


def test_pseudo_words_are_distinct_and_seed_free():
    words = pseudo_words(48)
    assert len(set(words)) == 48 and all(len(w) == 4 and w.isascii() and w.isalpha() for w in words)
    assert pseudo_words(10) == words[:10]
    assert len({w[:2] for w in words}) > 10  # spread over the grid, not all "ba.."
    with pytest.raises(ValueError, match="vocab_size"):
        pseudo_words(1)


def test_records_are_deterministic_by_seed_and_well_formed():
    records = synthetic_domain_records(num_domains=3, records_per_domain=20, seed=5)
    assert records == synthetic_domain_records(num_domains=3, records_per_domain=20, seed=5)
    assert records != synthetic_domain_records(num_domains=3, records_per_domain=20, seed=6)
    # More records extend the list without changing the first ones (the chain does not depend on the count).
    assert synthetic_domain_records(num_domains=3, records_per_domain=8, seed=5) == records[:24]
    assert [r["domain"] for r in records[:6]] == list(DOMAIN_NAMES[:3]) * 2  # interleaved
    assert collections.Counter(r["domain"] for r in records) == {name: 20 for name in DOMAIN_NAMES[:3]}
    vocabulary = set(pseudo_words(48))
    for record in records:
        tag, prompt = record["instruction"].split("续写：")
        assert tag == f"【{record['domain']}】"
        assert len(prompt.split(" ")) == 4 and len(response_words(record)) == 16
        assert set(prompt.split(" ") + response_words(record)) <= vocabulary
    untagged = synthetic_domain_records(num_domains=3, records_per_domain=2, seed=5, tag_in_prompt=False)
    assert all(r["instruction"].startswith("续写：") for r in untagged)


def test_chain_tables_are_distributions_that_differ_between_domains():
    domains = markov_domains(num_domains=4, vocab_size=48, seed=0)
    for table in (*domains.transitions, domains.averaged()):
        assert all(math.isclose(sum(row), 1.0, abs_tol=1e-12) for row in table)
    first, second = domains.transitions[0], domains.transitions[1]
    top = [max(range(48), key=row.__getitem__) for row in first]
    assert sum(top[w] != max(range(48), key=second[w].__getitem__) for w in range(48)) > 30
    blocks = [set(block) for block in domains.home_blocks]
    assert set().union(*blocks) == set(range(48)) and sum(map(len, blocks)) == 48  # a partition


@pytest.mark.parametrize("home_bias", [0.0, 0.5])
def test_knowing_the_domain_is_worth_a_lot_of_loss(home_bias):
    floors = markov_domains(home_bias=home_bias).optimal_loss_nats()
    assert floors["knowing_domain"] < floors["current_word_only"] - 0.5


def test_home_bias_makes_the_current_word_tell_the_domain():
    """With home_bias the domains' word frequencies differ: the current word alone predicts better."""
    flat = markov_domains(home_bias=0.0).optimal_loss_nats()["current_word_only"]
    biased = markov_domains(home_bias=0.9).optimal_loss_nats()["current_word_only"]
    assert biased < flat - 0.3


def bigram_classifier(train):
    """Per domain, add-one smoothed bigram log-probabilities of the response words."""
    counts = collections.defaultdict(collections.Counter)
    for record in train:
        words = response_words(record)
        counts[record["domain"]].update(zip(words, words[1:]))
    vocabulary = 48

    def score(domain, words):
        table = counts[domain]
        firsts = collections.Counter()
        for (first, _), n in table.items():
            firsts[first] += n
        return sum(math.log((table[(a, b)] + 1) / (firsts[a] + vocabulary)) for a, b in zip(words, words[1:]))

    return lambda words: max(counts, key=lambda domain: score(domain, words))


@pytest.mark.parametrize("home_bias", [0.0, 0.5])
def test_a_bigram_classifier_tells_the_domains_apart(home_bias):
    records = synthetic_domain_records(records_per_domain=60, home_bias=home_bias, seed=1)
    train, held_out = split_records(records, 0.25, seed=0)
    classify = bigram_classifier(train)
    accuracy = sum(classify(response_words(r)) == r["domain"] for r in held_out) / len(held_out)
    assert accuracy > 0.95
    # The control: texts of the one averaged chain under four labels are near chance (1/4) for the same classifier.
    texts = pretraining_texts(num_texts=240, words_per_text=16, home_bias=home_bias, seed=1)
    control = [{"response": text, "domain": DOMAIN_NAMES[i % 4]} for i, text in enumerate(texts)]
    train, held_out = split_records(control, 0.25, seed=0)
    classify = bigram_classifier(train)
    assert sum(classify(response_words(r)) == r["domain"] for r in held_out) / len(held_out) < 0.45


def test_pretraining_texts_follow_the_averaged_chain():
    texts = pretraining_texts(num_texts=200, words_per_text=24, seed=3)
    assert texts == pretraining_texts(num_texts=200, words_per_text=24, seed=3)
    assert len(texts) == 200 and all(len(t.split(" ")) == 24 for t in texts)
    domains = markov_domains(seed=3)
    index = {w: i for i, w in enumerate(domains.words)}

    def log_likelihood(table):
        total = 0.0
        for text in texts:
            ids = [index[w] for w in text.split(" ")]
            total += sum(math.log(table[a][b]) for a, b in zip(ids, ids[1:]))
        return total

    averaged = log_likelihood(domains.averaged())
    assert all(averaged > log_likelihood(table) for table in domains.transitions)


@pytest.mark.parametrize("bad", [dict(num_domains=1), dict(num_domains=11), dict(vocab_size=6),
                                 dict(home_bias=1.5), dict(smoothing=1.0), dict(branching=0),
                                 dict(records_per_domain=0), dict(response_words=0)])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        synthetic_domain_records(**{"records_per_domain": 2, **bad})


# --- the demo set by department -------------------------------------------------------------------------------

def test_department_records_label_every_demo_record_with_its_department():
    records = department_records()
    assert [{k: v for k, v in r.items() if k != "domain"} for r in records] == demo_records()
    sizes = departments()
    assert sum(sizes.values()) == len(FACTS)
    per_record = len(demo_records()) // len(FACTS)
    assert collections.Counter(r["domain"] for r in records) == {d: n * per_record for d, n in sizes.items()}
    # Where a record states the department, it agrees with the label.
    stated = [r for r in records if "属于" in r.get("response", "")]
    assert stated and all(f"属于{r['domain']}疾病" in r["response"] for r in stated)


def test_department_records_keep_some_departments():
    kept = department_records(keep=["心内科", "眼科"])
    assert {r["domain"] for r in kept} == {"心内科", "眼科"}
    assert len(kept) == (departments()["心内科"] + departments()["眼科"]) * 6
    with pytest.raises(ValueError, match="牙科"):
        department_records(keep=["牙科"])


# --- splitting and indexing -----------------------------------------------------------------------------------

def test_split_is_stratified_disjoint_and_deterministic():
    records = synthetic_domain_records(num_domains=3, records_per_domain=30, seed=2)
    records += [{"instruction": "x", "response": "y", "domain": "单"}]  # a one-record domain stays in train
    train, held_out = split_records(records, 0.2, seed=4)
    assert (train, held_out) == split_records(records, 0.2, seed=4)
    assert held_out != split_records(records, 0.2, seed=5)[1]
    ids = lambda part: [id(r) for r in part]  # noqa: E731
    assert not set(ids(train)) & set(ids(held_out))
    assert sorted(ids(train) + ids(held_out)) == sorted(ids(records))
    assert ids(train) == [i for i in ids(records) if i in set(ids(train))]  # original order kept
    assert collections.Counter(r["domain"] for r in held_out) == {name: 6 for name in DOMAIN_NAMES[:3]}
    demo_train, demo_eval = split_records(department_records(), 0.1, seed=0)
    per_domain = collections.Counter(r["domain"] for r in demo_eval)
    assert set(per_domain) == set(departments())  # every department (even a 6-record one) is evaluated
    assert all(1 <= n <= 3 for n in per_domain.values())


def test_split_and_index_need_a_domain_field():
    records = [{"instruction": "a", "response": "b", "domain": "甲"}, {"instruction": "a", "response": "b"}]
    with pytest.raises(DataError, match="record 1 has no string 'domain'"):
        split_records(records, 0.5)
    with pytest.raises(DataError, match="record 1"):
        domain_index(records)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_records(records[:1], 0.0)
    assert domain_index(synthetic_domain_records(num_domains=3, records_per_domain=2)) == {"甲": 0, "乙": 1, "丙": 2}


# --- through the ordinary data path ---------------------------------------------------------------------------

def test_records_train_through_the_data_path(tmp_path):
    records = synthetic_domain_records(records_per_domain=10, seed=0)
    # format_example reads only the keys it needs: the domain field changes nothing.
    stripped = {k: v for k, v in records[0].items() if k != "domain"}
    assert format_example(records[0]) == format_example(stripped)
    loaded = load_jsonl(write_jsonl(records, tmp_path / "domains.jsonl"))
    assert loaded == records  # the field survives a JSONL round trip
    tokenizer = build_tokenizer(corpus(records) + pretraining_texts(num_texts=50), vocab_size=600)
    for word in pseudo_words(48):  # one token per word, as the analysis per token assumes
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for record, (ids, labels) in zip(records, encode(records, tokenizer, max_length=64)):
        response = [t for t, label in zip(ids, labels) if label != -100]
        assert response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response[:-1]) == record["response"]
        assert len(response) == 17  # 16 words and eos
