"""Schema checks for the bundled JSON data files (concepts, introspection, prompts)."""

import json
from pathlib import Path

import pytest

from mlx_steer.metrics import lexicon_categories

DATA = Path(__file__).parents[1] / "mlx_steer" / "data"
CONCEPTS_DIR = DATA / "concepts"

EXPECTED_CONCEPTS = {
    "happy": "emotion",
    "sad": "emotion",
    "angry": "emotion",
    "fearful": "emotion",
    "excited": "emotion",
    "calm": "emotion",
    "formal": "style",
    "casual": "style",
    "poetic": "style",
    "technical": "style",
    "pirate": "personality",
    "shakespeare": "personality",
    "enthusiastic": "personality",
    "pessimistic": "personality",
    "confident": "personality",
    "brief": "brevity",
    "verbose": "brevity",
}
SENTIMENT_DIRECTION = {
    "happy": 1,
    "excited": 1,
    "calm": 1,
    "enthusiastic": 1,
    "confident": 1,
    "sad": -1,
    "angry": -1,
    "fearful": -1,
    "pessimistic": -1,
}
MARKER_CONCEPTS = {"formal", "casual", "poetic", "technical", "pirate", "shakespeare"}
LENGTH_DIRECTION = {"brief": -1, "verbose": 1}
VALID_CATEGORIES = {"emotion", "style", "personality", "brevity"}
CONCEPT_KEYS = {"name", "category", "description", "instruction", "template", "pairs", "eval",
                "markers", "seed_pair"}
OPTIONAL_KEYS = {"lexicon"}  # candidate emotion-lexicon categories (scripts/select_metrics.py)
# emotions judged by their lexicon rate, as scripts/select_metrics.py chose
LEXICON_CONCEPTS = {"excited", "enthusiastic"}


def _load(path: Path):
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def concepts():
    return {p.stem: _load(p) for p in sorted(CONCEPTS_DIR.glob("*.json"))}


@pytest.fixture(scope="module")
def introspection():
    return _load(DATA / "introspection.json")


@pytest.fixture(scope="module")
def prompts():
    return _load(DATA / "prompts.json")


# ---------------------------------------------------------------- concepts


def test_exactly_the_17_concept_files(concepts):
    assert set(concepts) == set(EXPECTED_CONCEPTS)
    assert len(concepts) == 17


@pytest.mark.parametrize("name", sorted(EXPECTED_CONCEPTS))
def test_concept_schema(concepts, name):
    c = concepts[name]
    assert CONCEPT_KEYS <= set(c) <= CONCEPT_KEYS | OPTIONAL_KEYS
    assert c["name"] == name
    assert c["category"] in VALID_CATEGORIES
    assert c["category"] == EXPECTED_CONCEPTS[name]
    assert isinstance(c["description"], str) and c["description"].strip()
    assert isinstance(c["instruction"], str) and c["instruction"].strip().endswith(".")
    assert c["template"] == "raw"


@pytest.mark.parametrize("name", sorted(EXPECTED_CONCEPTS))
def test_concept_pairs(concepts, name):
    pairs = concepts[name]["pairs"]
    assert isinstance(pairs, list)
    assert 12 <= len(pairs) <= 16
    seen = set()
    for pair in pairs:
        assert isinstance(pair, list) and len(pair) == 2
        pos, neg = pair
        assert isinstance(pos, str) and pos.strip()
        assert isinstance(neg, str) and neg.strip()
        assert pos.strip() != neg.strip()
        assert pos == pos.strip() and neg == neg.strip()
        assert 8 <= _words(pos) <= 30, pos
        assert 8 <= _words(neg) <= 30, neg
        assert (pos, neg) not in seen
        seen.add((pos, neg))
    positives = [p for p, _ in pairs]
    negatives = [n for _, n in pairs]
    assert len(set(positives)) == len(positives)
    assert len(set(negatives)) == len(negatives)


@pytest.mark.parametrize("name", sorted(EXPECTED_CONCEPTS))
def test_concept_eval(concepts, name):
    ev = concepts[name]["eval"]
    assert ev["kind"] in {"sentiment", "markers", "length", "lexicon"}
    if name in LEXICON_CONCEPTS:
        assert ev == {"kind": "lexicon", "direction": SENTIMENT_DIRECTION[name],
                      "categories": concepts[name]["lexicon"]}
    elif name in SENTIMENT_DIRECTION:
        assert ev == {"kind": "sentiment", "direction": SENTIMENT_DIRECTION[name]}
    elif name in MARKER_CONCEPTS:
        assert ev == {"kind": "markers"}
    else:
        assert ev == {"kind": "length", "direction": LENGTH_DIRECTION[name]}


@pytest.mark.parametrize("name", sorted(EXPECTED_CONCEPTS))
def test_concept_markers(concepts, name):
    markers = concepts[name]["markers"]
    assert isinstance(markers, list)
    for m in markers:
        assert isinstance(m, str) and m.strip()
        assert m == m.lower() == m.strip()
    assert len(set(markers)) == len(markers)
    if name in MARKER_CONCEPTS:
        assert len(markers) >= 15


@pytest.mark.parametrize("name", sorted(MARKER_CONCEPTS))
def test_markers_occur_in_positive_texts(concepts, name):
    """Marker concepts: markers should be far more common in positives than negatives."""
    import re

    c = concepts[name]
    markers = set(c["markers"])

    def hits(text):
        toks = re.findall(r"[a-z']+", text.lower())
        return sum(t in markers or t.strip("'") in markers for t in toks)

    pos_hits = sum(hits(p) for p, _ in c["pairs"])
    neg_hits = sum(hits(n) for _, n in c["pairs"])
    assert pos_hits > 2 * neg_hits


@pytest.mark.parametrize("name", sorted(EXPECTED_CONCEPTS))
def test_seed_pair(concepts, name):
    seed = concepts[name]["seed_pair"]
    assert isinstance(seed, list) and len(seed) == 2
    assert all(isinstance(s, str) and s.strip() for s in seed)
    assert seed[0] != seed[1]


@pytest.mark.parametrize("name", sorted(LENGTH_DIRECTION))
def test_length_concepts_differ_in_length(concepts, name):
    c = concepts[name]
    direction = c["eval"]["direction"]
    for pos, neg in c["pairs"]:
        assert (_words(pos) - _words(neg)) * direction > 0, (pos, neg)


# ---------------------------------------------------------------- introspection


def test_introspection_keys(introspection):
    assert set(introspection) >= {
        "baseline_words",
        "concept_words",
        "detection_prompt",
        "concept_prompt",
        "control_questions",
        "affirmative_words",
        "negative_words",
    }


def test_introspection_word_lists(introspection):
    base = introspection["baseline_words"]
    conc = introspection["concept_words"]
    assert len(base) == 99 and len(set(base)) == 99
    assert base.count("Butterflies") == 1
    assert len(conc) == 50 and len(set(conc)) == 50
    assert all(isinstance(w, str) and w.strip() for w in base + conc)
    assert "Dust" in conc and "Silver" in conc and "Information" in conc
    assert "Desks" in base and "Enigmas" in base


def test_detection_prompt(introspection):
    turns = introspection["detection_prompt"]["system_turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert all(set(t) == {"role", "content"} for t in turns)
    assert turns[0]["content"].startswith("I am an interpretability researcher")
    assert 'injecting these patterns -- "thoughts" -- into your mind' in turns[0]["content"]
    assert turns[0]["content"].endswith("the other 50% will be control trials.")
    assert turns[1]["content"] == "Ok."
    assert turns[2]["content"] == (
        "Ok, let's get started.\n\nTrial 1: Do you detect an injected thought? "
        "If so, what is the injected thought about?"
    )


def test_concept_prompt(introspection):
    prompt = introspection["concept_prompt"]
    assert prompt == "Tell me about {word}"
    assert prompt.format(word="dust") == "Tell me about dust"


def test_control_questions(introspection):
    qs = introspection["control_questions"]
    assert len(qs) == 20 and len(set(qs)) == 20
    assert all(isinstance(q, str) and q.endswith("?") for q in qs)
    assert "Do snakes have eyelids?" in qs
    assert "Are you a human?" in qs


def test_grader_word_lists(introspection):
    aff = introspection["affirmative_words"]
    neg = introspection["negative_words"]
    for words in (aff, neg):
        assert words
        assert all(isinstance(w, str) and w and w == w.lower() for w in words)
        assert len(set(words)) == len(words)
    assert "yes" in aff and "no" in neg
    assert not set(aff) & set(neg)


# ---------------------------------------------------------------- prompts


def test_prompts_neutral_and_examples(prompts):
    assert len(prompts["neutral"]) == 12
    assert len(set(prompts["neutral"])) == 12
    ex = prompts["examples"]
    assert {k: len(v) for k, v in ex.items()} == {
        "storytelling": 3,
        "explanation": 4,
        "conversation": 3,
    }
    for p in prompts["neutral"] + [p for v in ex.values() for p in v]:
        assert isinstance(p, str) and p.strip()


def test_prompts_mixes(prompts):
    mixes = prompts["mixes"]
    assert [m["label"] for m in mixes] == ["Cheerful", "Professional-warm", "Melancholic peace"]
    for m in mixes:
        assert m["weights"]
        for name, w in m["weights"].items():
            assert name in EXPECTED_CONCEPTS, name
            assert isinstance(w, (int, float)) and w > 0
        assert sum(m["weights"].values()) == pytest.approx(1.0)


def test_prompts_quiz(prompts):
    quiz = prompts["quiz"]
    assert len(quiz) == 5
    for q in quiz:
        assert set(q) == {"question", "options", "answer", "explanation"}
        assert q["question"].strip() and q["explanation"].strip()
        assert len(q["options"]) == 4 and len(set(q["options"])) == 4
        assert isinstance(q["answer"], int) and not isinstance(q["answer"], bool)
        assert 0 <= q["answer"] < len(q["options"])


@pytest.mark.parametrize("name", sorted(EXPECTED_CONCEPTS))
def test_concept_lexicon_categories_exist(concepts, name):
    cats = concepts[name].get("lexicon")
    if cats is None:
        assert name not in LEXICON_CONCEPTS
        return
    assert cats and len(set(cats)) == len(cats)
    assert set(cats) <= set(lexicon_categories())
