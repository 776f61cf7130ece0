import math

import numpy as np
import pytest

from mlx_steer import metrics as m


def test_sentiment_signs():
    assert m.sentiment("I love this wonderful day") > 0.5
    assert m.sentiment("terrible awful hate") < -0.5
    assert m.sentiment("") == 0.0


def test_words_keep_apostrophes():
    assert m.words("Don't STOP, it’s fine!") == ["don't", "stop", "it's", "fine"]


def test_marker_rate():
    assert m.marker_rate("Arr matey, ye be a pirate", ["arr", "matey", "ye"]) == 3 / 6
    assert m.marker_rate("", ["arr"]) == 0.0
    assert m.marker_rate("no markers here", ["arr"]) == 0.0


def test_marker_rate_multiword_spans_its_words():
    text = "shiver me timbers and shiver me timbers again"
    assert m.marker_rate(text, ["shiver me timbers"]) == 6 / 8
    assert m.marker_rate(text, ["shiver me timbers", "timbers"]) == 6 / 8


def test_repetition_and_distinct():
    text = "a b c a b c a b c"
    # 7 trigrams, 3 distinct (abc, bca, cab)
    assert m.repetition_rate(text, 3) == pytest.approx(1 - 3 / 7)
    # 8 bigrams, 3 distinct (ab, bc, ca)
    assert m.distinct_n(text, 2) == pytest.approx(3 / 8)
    assert m.repetition_rate("a b", 3) == 0.0
    assert m.distinct_n("a", 2) == 0.0
    assert m.repetition_rate("one two three four", 3) == 0.0


def test_log_softmax_stable_and_normalised():
    out = m.log_softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]], dtype=np.float32))
    assert out.dtype == np.float64
    assert np.allclose(out[0], np.log(0.5))
    assert np.allclose(np.exp(out).sum(axis=-1), 1.0)


def test_kl_identical_is_zero():
    logits = np.random.default_rng(0).normal(size=50)
    assert m.kl_divergence(logits, logits) == 0.0
    assert m.kl_divergence(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)


def test_kl_two_class_closed_form():
    a, b = 0.7, -0.4
    p = 1 / (1 + math.exp(-a))
    q = 1 / (1 + math.exp(-b))
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert m.kl_divergence(np.array([a, 0.0]), np.array([b, 0.0])) == pytest.approx(expected)


def test_kl_rejects_bad_shapes():
    with pytest.raises(ValueError):
        m.kl_divergence(np.zeros(3), np.zeros(4))


def test_perplexity_uniform_equals_vocab():
    V, T = 17, 5
    assert m.perplexity(np.zeros((T, V)), np.arange(T)) == pytest.approx(V)


def test_perplexity_confident_is_one():
    logits = np.full((3, 4), -1e4)
    targets = np.array([2, 0, 3])
    logits[np.arange(3), targets] = 0.0
    assert m.perplexity(logits, targets) == pytest.approx(1.0)


def test_perplexity_errors():
    with pytest.raises(ValueError):
        m.perplexity(np.zeros((3, 4)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError):
        m.perplexity(np.zeros((0, 4)), np.zeros(0, dtype=int))


def test_projection_hand_computed():
    hidden = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)  # (L=2, T=3, D=2)
    direction = np.array([3.0, 4.0])  # unit (0.6, 0.8)
    out = m.projection(hidden, direction)
    assert out.shape == (2, 3)
    assert np.isnan(out[:, 0]).all()
    # hidden[1, 2] = (10, 11) -> 0.6*10 + 0.8*11
    assert out[1, 2] == pytest.approx(14.8)
    assert m.projection(hidden, direction, exclude_first=False)[0, 0] == pytest.approx(0.8)


def test_projection_per_layer_direction():
    hidden = np.ones((2, 2, 2))
    directions = np.array([[2.0, 0.0], [0.0, -5.0]])
    out = m.projection(hidden, directions, exclude_first=False)
    assert np.allclose(out, [[1.0, 1.0], [-1.0, -1.0]])
    with pytest.raises(ValueError):
        m.projection(hidden, np.ones((3, 2)))


def test_cosine_matrix():
    vecs = np.random.default_rng(1).normal(size=(4, 8))
    cos = m.cosine_matrix(vecs)
    assert cos.shape == (4, 4)
    assert np.allclose(np.diag(cos), 1.0)
    assert np.allclose(cos, cos.T)
    assert m.cosine_matrix(np.array([[1.0, 0.0], [-2.0, 0.0]]))[0, 1] == pytest.approx(-1.0)


def test_pca_2d_line_and_sign():
    t = np.linspace(-2, 3, 7)
    points = np.outer(t, [1.0, 2.0, -2.0]) + 5.0
    out = m.pca_2d(points)
    assert out.shape == (7, 2)
    assert np.allclose(out[:, 1], 0.0, atol=1e-9)
    assert np.allclose(np.abs(out[:, 0]), np.abs(t - t.mean()) * 3.0)
    assert np.allclose(m.pca_2d(points), out)
    # sign rule: the largest-|value| loading is positive, so flipping the data flips the scores' order only
    assert np.allclose(np.sort(m.pca_2d(-points)[:, 0]), np.sort(out[:, 0]))


def test_pca_2d_single_dimension_pads():
    out = m.pca_2d(np.array([[1.0], [2.0], [4.0]]))
    assert out.shape == (3, 2)
    assert np.allclose(out[:, 1], 0.0)


def test_massive_positions():
    layer = np.random.default_rng(2).normal(size=(6, 32))
    layer[3, 7] = 5e4
    mask = m.massive_positions(layer)
    assert mask.dtype == bool
    assert mask.tolist() == [True, False, False, True, False, False]


def test_massive_positions_needs_absolute_threshold():
    layer = np.full((4, 8), 1e-4)
    layer[2, 0] = 50.0  # > 1000 × median but not > 100
    assert m.massive_positions(layer).tolist() == [True, False, False, False]


def test_lexicon_rate_counts_category_words():
    # "furious" and "rage" are Empath anger words; the other words are not
    assert m.lexicon_rate("I am furious, full of rage!", ["anger"]) == pytest.approx(2 / 6)
    assert m.lexicon_rate("I am furious, full of rage!", ["joy"]) == 0.0
    assert m.lexicon_rate("", ["anger"]) == 0.0
    # a word in several chosen categories counts once
    both = m.lexicon_rate("furious", ["anger", "rage"])
    assert both == 1.0


def test_lexicon_rate_rejects_unknown_categories():
    from mlx_steer.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="unknown lexicon"):
        m.lexicon_rate("hello", ["no_such_category"])
    with pytest.raises(InvalidArgumentError):
        m.lexicon_rate("hello", [])
    assert "anger" in m.lexicon_categories() and "zest" in m.lexicon_categories()
