"""Answer normalisation and parsing (mllm_kd.eval.normalize, ScienceQA's letter parser)."""

import pytest

from mllm_kd.eval.normalize import (
    evalai_normalize,
    mme_yes_no,
    pope_yes_no,
    process_punctuation,
    simple_normalize,
    soft_accuracy,
    vqa_normalize,
)
from mllm_kd.eval.tasks.gqa import gqa_normalize
from mllm_kd.eval.tasks.scienceqa import parse_letter


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),  # trailing period dropped, number word -> digit
        ("ten dogs", "10 dogs"),
        ("none", "0"),  # the official map has none -> 0
        ("1,000", "1000"),  # a digit comma makes every mark vanish instead of becoming a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("The dog", "dog"),  # articles go
        ("a cat.", "cat"),
        ("It's", "it's"),  # the apostrophe is not in the official punctuation list...
        ("its", "its"),  # ...so "it's" and "its" stay different
        ("Dont", "don't"),  # contractions are restored
        ("black-white", "black white"),  # a mark inside a word becomes a space
        ("yes !", "yes"),  # a mark next to a space is removed
        ("Yes, it is.", "yes it is"),  # a yes buried in a sentence is not "yes"
        ("  Yes\n", "yes"),
    ],
)
def test_vqa_normalize(raw, expected):
    assert vqa_normalize(raw) == expected


def test_process_punctuation_only():
    # Human answers get punctuation processing only: no lower-casing, digits or articles.
    assert process_punctuation("The Two-Dogs.") == "The Two Dogs"


def test_evalai_normalize_differs_on_possessives_and_commas():
    # EvalAI (TextVQA, uploads) splits "'s" and drops commas before the official steps.
    assert evalai_normalize("It's") == "it 's"
    assert evalai_normalize("Yes, it is?") == "yes it is"
    assert evalai_normalize("1,000") == "1000"
    assert evalai_normalize("The Two.") == "2"


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_table(k, expected):
    # 10 humans, k say "2". Leaving out one of the k leaves k-1 matches, leaving out another leaves k:
    # k=1: (1*min(1,0/3) + 9*min(1,1/3))/10 = 0.3; k=2: (2*1/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7*1)/10 = 0.9
    gts = ["2"] * k + ["3"] * (10 - k)
    assert soft_accuracy("2", gts) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is no car in the image.", "no"),  # a "no" word anywhere in the first sentence
        ("I do not see one", "no"),  # "not"
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # eval_pope.py only knows "No", "no" and "not"
        ("Nope", "yes"),
    ],
)
def test_pope_yes_no(text, expected):
    assert pope_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("NO", "no"),
        ("No, there is no cat.", "no"),
        ("not sure", "no"),
        ("There is a bus.", "other"),
    ],
)
def test_mme_yes_no(text, expected):
    # "yes"/"no" within the first four characters, else "other"
    assert mme_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        (" C", None),  # eval_science_qa.py does not strip: " C" is not an option
        ("A. cat", "A"),
        ("The answer is D.", "D"),
        ("Because... The answer is E", None),  # "The answer is ([A-Z])." needs one more character
        ("Because... The answer is E!", "E"),  # ...any character: the "." is not escaped there
        ("The answer is A. No, The answer is B.", None),  # two matches: failed
        ("The answer is A. No, the answer is B.", "A"),  # case-sensitive: one match
        ("B\nbecause", None),  # neither "B" nor "B. " nor "The answer is"
        ("b", None),  # eval_science_qa.py is case-sensitive
        ("A.cat", None),
        ("AB", None),
        ("", None),
    ],
)
def test_scienceqa_parse_letter(text, expected):
    assert parse_letter(text) == expected


def test_simple_and_gqa_normalize():
    assert simple_normalize("The Circle.") == "circle"
    assert simple_normalize("It's  a red-ish one!") == "its red ish one"
    # rstrip('.') without strip(): " Left. " ends in a space, so its period stays, and so do the spaces
    assert gqa_normalize(" Left. ") == " left. "
    assert gqa_normalize("Left..") == "left"
    assert gqa_normalize("The white one") == "the white one"  # GQA keeps articles
