"""Tests for the QA metrics: SQuAD v1.1 normalisation, exact match and token F1.

The rules are the official SQuAD v1.1 evaluation script's (InstructRetro scored with them):
lower-case, delete ASCII string.punctuation, delete whole-word a/an/the, collapse
whitespace; F1 is 0 when no token is shared, EM compares the normalised strings.

Every expected value below was worked out by hand; the arithmetic sits in the comments.
F1 = 2 * p * r / (p + r), with p = overlap / len(prediction tokens) and
r = overlap / len(gold tokens), the overlap counted with multiplicity (Counter &).
"""

from __future__ import annotations

import string

import pytest

from retro_toolkit.collections.qa.metrics import exact_match, f1_score, normalize

# ---------------------------------------------------------------- normalize


def test_normalize_lowercases_and_collapses_whitespace():
    assert normalize("  Raw \t\n  STRINGS  ") == "raw strings"
    # no-break space and ideographic space count as whitespace for str.split()
    assert normalize("x\u00a0\u3000y") == "x y"
    assert normalize("") == ""
    assert normalize(" \n\t ") == ""


def test_normalize_deletes_punctuation_without_inserting_spaces():
    assert normalize("Hello, world!") == "hello world"
    assert normalize("don't") == "dont"  # the apostrophe goes, the two halves join
    assert normalize("e.g. (see below)") == "eg see below"
    assert normalize("__init__") == "init"  # "_" is in string.punctuation


def test_normalize_deletes_every_ascii_punctuation_character_including_symbols():
    # Changed from the old Unicode-category rule, which kept "+", "=", "$", "<" (symbols, S*):
    # SQuAD v1.1 deletes all of string.punctuation, symbols included.
    assert normalize(string.punctuation) == ""
    assert all(normalize(f"x{ch}y") == "xy" for ch in string.punctuation)
    assert normalize("1 + 1 = 2") == "1 1 2"
    assert normalize("$5 < $6") == "5 6"
    assert normalize("a+b") == "ab"  # joined into one word, so "a" is no longer an article
    assert normalize("a + b") == "b"  # here "a" stands alone and goes


def test_normalize_drops_whole_word_articles():
    assert normalize("The cat and a dog saw an owl") == "cat and dog saw owl"
    assert normalize("A AN THE") == ""


def test_normalize_keeps_article_letters_inside_words():
    assert normalize("theatre") == "theatre"
    assert normalize("another anthem") == "another anthem"
    assert normalize("Thea is an atheist") == "thea is atheist"
    assert normalize("The theory") == "theory"


def test_normalize_removes_punctuation_before_articles():
    # "(the)" becomes "the" and is then dropped; "the-end" becomes one word "theend" and stays.
    assert normalize("(the) end") == "end"
    assert normalize("the-end") == "theend"


def test_normalize_keeps_non_ascii_punctuation():
    # Changed from the old rule, which deleted all Unicode punctuation: SQuAD v1.1 deletes
    # ASCII punctuation only. « », the em dash and "…" stay; the ASCII hyphen goes.
    assert normalize("«Bonjour» \u2014 dit-il\u2026") == "«bonjour» \u2014 ditil\u2026"
    # curly quotes and inverted marks stay; the ASCII "?" and "!" go
    assert normalize("\u201cQu\u00e9?\u201d \u00bfS\u00ed! \u00a1Vale!") == (
        "\u201cqu\u00e9\u201d \u00bfs\u00ed \u00a1vale")
    assert normalize("\u00abParis\u00bb") == "\u00abparis\u00bb"
    assert normalize("1990\u20131995") == "1990\u20131995"  # en dash kept
    assert normalize("1990-1995") == "19901995"  # ASCII hyphen deleted


def test_normalize_keeps_accented_letters():
    assert normalize("Cr\u00e8me Br\u00fbl\u00e9e") == "cr\u00e8me br\u00fbl\u00e9e"
    assert normalize("\u00c9COLE") == "\u00e9cole"  # uppercase accented letter is lowercased, not stripped


def test_normalize_handles_non_latin_scripts():
    # Russian; the em dash stays
    assert normalize("\u041c\u043e\u0441\u043a\u0432\u0430 \u2014 \u0441\u0442\u043e\u043b\u0438\u0446\u0430!") == (
        "\u043c\u043e\u0441\u043a\u0432\u0430 \u2014 \u0441\u0442\u043e\u043b\u0438\u0446\u0430")
    assert normalize("\u6771\u4eac\u3002") == "\u6771\u4eac\u3002"  # Japanese full stop U+3002 is not ASCII
    assert normalize("\u0645\u0631\u062d\u0628\u0627\u060c \u0639\u0627\u0644\u0645") == (
        "\u0645\u0631\u062d\u0628\u0627\u060c \u0639\u0627\u0644\u0645")  # nor is the Arabic comma U+060C


# ---------------------------------------------------------------- exact match


def test_exact_match_after_normalisation():
    assert exact_match("The Context Manager!", "context manager") == 1.0
    assert exact_match("  raw\n\tstrings ", "raw strings") == 1.0
    assert exact_match("raw string", "raw strings") == 0.0  # no stemming
    assert exact_match("not is", "is not") == 0.0  # order matters for EM
    assert isinstance(exact_match("x", "x"), float)


def test_exact_match_takes_the_max_over_golds_in_any_order():
    golds = ["None", "the None object"]
    assert exact_match("none object", golds) == 1.0  # matches the second gold only
    assert exact_match("none object", list(reversed(golds))) == 1.0
    assert exact_match("nothing", golds) == 0.0
    # a plain string gold behaves like a one-element list
    assert exact_match("None.", "none") == exact_match("None.", ["none"]) == 1.0


def test_exact_match_ignores_ascii_punctuation_and_symbols():
    assert exact_match("$5", "5") == 1.0
    assert exact_match("a+b", "ab") == 1.0
    assert exact_match("The U.S.A.", "usa") == 1.0
    assert exact_match("100%", "100") == 1.0
    assert exact_match("\u00abParis\u00bb", "Paris") == 0.0  # « » are not ASCII: they stay
    assert exact_match("theory", "ory") == 0.0  # "the" inside a word is no article


def test_exact_match_does_not_strip_accents():
    assert exact_match('"S\u00e3o Paulo"', "s\u00e3o paulo") == 1.0
    assert exact_match("Sao Paulo", "s\u00e3o paulo") == 0.0


# ---------------------------------------------------------------- F1


def test_f1_hand_computed_partial_overlaps():
    # pred {x, y, z}, gold {x, w}: overlap 1, p 1/3, r 1/2 -> 2*(1/6)/(5/6) = 0.4
    assert f1_score("x y z", "x w") == pytest.approx(0.4)
    # pred {def, keyword}, gold {def}: overlap 1, p 1/2, r 1 -> 2*(1/2)/(3/2) = 2/3
    assert f1_score("def keyword", "def") == pytest.approx(2 / 3)
    # "a complex number" -> {complex, number} (article dropped) vs {complex}: p 1/2, r 1 -> 2/3
    assert f1_score("a complex number", "complex") == pytest.approx(2 / 3)
    # pred {finally}, gold {finally, clause}: p 1, r 1/2 -> 2*(1/2)/(3/2) = 2/3
    assert f1_score("finally", "finally clause") == pytest.approx(2 / 3)


def test_f1_partial_overlaps_with_punctuation_and_articles():
    # "$5 million" -> {5, million} vs {5, million, dollars}: overlap 2, p 1, r 2/3 -> 2*(2/3)/(5/3) = 0.8
    assert f1_score("$5 million", "5 million dollars") == pytest.approx(0.8)
    # "Paris — France" -> {paris, —, france} vs {paris, france}: overlap 2, p 2/3, r 1 -> 0.8
    assert f1_score("Paris \u2014 France", "paris, france") == pytest.approx(0.8)
    # "«Paris», France" -> {«paris», france} vs {paris}: no shared token -> 0
    assert f1_score("\u00abParis\u00bb, France", "Paris") == 0.0
    # "the theory of a+b" -> {theory, of, ab} vs "theory" -> {theory}: p 1/3, r 1 -> 0.5
    assert f1_score("the theory of a+b", "theory") == pytest.approx(0.5)


def test_f1_exact_and_disjoint():
    assert f1_score("The Raw Strings.", "raw strings") == pytest.approx(1.0)
    assert f1_score("not is", "is not") == pytest.approx(1.0)  # bag of tokens: order is ignored
    assert f1_score("lambda", "def") == 0.0


def test_f1_takes_the_max_over_golds_in_any_order():
    # pred "the raw string literal" -> {raw, string, literal}, 3 tokens
    #   vs "raw strings": overlap 1 (raw), p 1/3, r 1/2 -> 0.4
    #   vs "raw string":  overlap 2,       p 2/3, r 1   -> 2*(2/3)/(5/3) = 0.8
    #   vs "string":      overlap 1,       p 1/3, r 1   -> 2*(1/3)/(4/3) = 0.5
    # max = 0.8
    golds = ["raw strings", "raw string", "string"]
    for order in (golds, golds[::-1], [golds[2], golds[0], golds[1]]):
        assert f1_score("the raw string literal", order) == pytest.approx(0.8)


def test_f1_counts_repeated_tokens_with_multiplicity():
    # pred {none: 3}, gold {none: 1}: overlap min(3, 1) = 1, p 1/3, r 1 -> 2*(1/3)/(4/3) = 0.5
    assert f1_score("none none none", "none") == pytest.approx(0.5)
    # pred {is: 2, not: 1}, gold {is: 2, not: 2}: overlap 2 + 1 = 3, p 3/3, r 3/4 -> 2*(3/4)/(7/4) = 6/7
    assert f1_score("is is not", "is not is not") == pytest.approx(6 / 7)
    # pred {to: 2}, gold {to: 1, be: 1}: overlap 1, p 1/2, r 1/2 -> 0.5
    assert f1_score("to to", "to be") == pytest.approx(0.5)


def test_f1_with_unicode_tokens():
    # pred {são, paulo, brasil}, gold {são, paulo}: overlap 2, p 2/3, r 1 -> 0.8
    assert f1_score("S\u00e3o Paulo, Brasil", "s\u00e3o paulo") == pytest.approx(0.8)
    # Changed from 2/3 under the old rule, which deleted « » and the em dash:
    # "«Москва» — столица" -> {«москва», —, столица} vs {москва}: no shared token -> 0
    pred = "\u00ab\u041c\u043e\u0441\u043a\u0432\u0430\u00bb \u2014 \u0441\u0442\u043e\u043b\u0438\u0446\u0430"
    assert f1_score(pred, "\u043c\u043e\u0441\u043a\u0432\u0430") == 0.0
    # "Москва — столица" -> {москва, —, столица} vs {москва}: overlap 1, p 1/3, r 1 -> 2*(1/3)/(4/3) = 0.5
    pred = "\u041c\u043e\u0441\u043a\u0432\u0430 \u2014 \u0441\u0442\u043e\u043b\u0438\u0446\u0430"
    assert f1_score(pred, "\u043c\u043e\u0441\u043a\u0432\u0430") == pytest.approx(0.5)
    # an unaccented spelling does not match the accented token
    assert f1_score("Sao Paulo", "s\u00e3o paulo") == pytest.approx(0.5)  # only "paulo": p 1/2, r 1/2


# ---------------------------------------------------------------- empty inputs


def test_empty_prediction_scores_zero_against_a_real_answer():
    assert f1_score("", "def") == 0.0
    assert exact_match("", "def") == 0.0
    # punctuation and articles only: normalises to nothing
    assert f1_score("The...!", "def") == 0.0
    assert exact_match("  ", ["def", "a def"]) == 0.0


def test_empty_gold_string():
    # Changed from F1 1.0 for two empty sides under the old rule: SQuAD v1.1 scores F1 0
    # whenever no token is shared, and two empty token lists share none. EM still compares
    # the normalised strings, and "" == "".
    assert f1_score("def", "") == 0.0
    assert f1_score("", "") == 0.0
    assert exact_match("", "") == 1.0
    # a gold that normalises to nothing behaves like an empty gold
    assert f1_score("a", "the") == 0.0
    assert exact_match("An.", "The") == 1.0
    assert exact_match("?!", "...") == 1.0
    # an empty gold among real ones gives an empty prediction EM 1 but F1 0
    assert f1_score("", ["def", ""]) == 0.0
    assert exact_match("", ["def", ""]) == 1.0
    assert f1_score("def", ["", "def"]) == 1.0


def test_an_empty_gold_list_raises_value_error():
    with pytest.raises(ValueError):
        exact_match("def", [])
    with pytest.raises(ValueError):
        f1_score("def", [])
    with pytest.raises(ValueError):
        f1_score("", ())
