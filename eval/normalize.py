"""Answer normalisation and answer parsing shared by the benchmark tasks, each a port of an official scorer.

* :func:`process_punctuation` / :func:`process_digit_article`: the official VQA evaluation's answer processing
  (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``), quirks included; VizWiz's own
  evaluation runs the same steps with its own contraction table (:data:`VIZWIZ_CONTRACTIONS`).
* :func:`vqa_accuracy`: the accuracy of one answer in the current (2021) ``vqaEval.py``: answers are
  normalised only when the human answers disagree. :func:`vqa_accuracy_2017` is the 2017 code.
* :func:`evalai_normalize`: the EvalAI answer processor (MMF, as LLaVA's ``llava/eval/m4c_evaluator.py``
  ships it) that LLaVA applies before uploading VQAv2 and VizWiz answers and that the TextVQA evaluator
  applies to both sides.
* :func:`soft_accuracy`: VQA accuracy with leave-one-out by position, min(1, #matching others / 3) averaged.
* :func:`pope_yes_no`, :func:`mme_yes_no`: yes/no parsing of LLaVA's eval_pope.py and MME's calculation.py.
* :func:`can_infer`: VLMEvalKit's option-letter matching (MMBench), without its ChatGPT fallback.

The tables below are the official ones (rules, not code), kept as the official files spell them.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Hashable, Mapping, Sequence

# From GT-Vision-Lab/VQA vqaEval.py (identical in EvalAIAnswerProcessor): contractions, number words,
# articles, punctuation.
# fmt: off
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# fmt: on
# VizWiz's vqaEval.py (the VizWiz-VQA API, vizwiz.org) has the same keys but writes most of them, and most
# expansions, with a curly apostrophe (U+2019): "dont" -> "don’t", "couldnt’ve" -> "couldn’t’ve". Its table
# is VQA's with every "'" made "’" except these entries, which it keeps straight.
_VIZWIZ_STRAIGHT_VALUES = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
_VIZWIZ_STRAIGHT_KEYS = {"couldn'tve", "hadn'tve"}
VIZWIZ_CONTRACTIONS = {
    (k if k in _VIZWIZ_STRAIGHT_KEYS else k.replace("'", "\u2019")): (
        v if k in _VIZWIZ_STRAIGHT_VALUES else v.replace("'", "\u2019")
    )
    for k, v in CONTRACTIONS.items()
}
# The official look-behind is mistyped ("(?!<=\d)" is a look-*ahead* for "<="+digit), so in effect a
# period is dropped unless a digit follows it ("3.5" stays, "two." -> "two"). Kept as is for fidelity.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the flag lands in `count`, so at most 32 periods go.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def strip_whitespace(text: str) -> str:
    """vqaEval.py's first step on every answer: newlines and tabs -> spaces, then ``strip()``."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 18)  # human answers repeat a lot: VQAv2 val has 2M of them
def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop a mark next to a space (or anywhere once "d,d" occurs, so
    "1,000" -> "1000"), otherwise turn it into a space ("black-white" -> "black white")."""
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str, contractions: Mapping[str, str] = CONTRACTIONS) -> str:
    """Official ``processDigitArticle``: lower-case, number words -> digits, drop articles, fix contractions
    (with VQA's table unless another is given: VizWiz passes :data:`VIZWIZ_CONTRACTIONS`)."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(contractions.get(w, w) for w in words)


@functools.lru_cache(maxsize=1 << 18)
def vqa_normalize(text: str) -> str:
    """What vqaEval.py does to an answer it normalises: whitespace, punctuation, digits/articles/contractions."""
    return process_digit_article(process_punctuation(strip_whitespace(text)))


def vizwiz_normalize(text: str) -> str:
    """What VizWiz's vqaEval.py does to every prediction (never to the human answers): as
    :func:`vqa_normalize` but with VizWiz's curly-apostrophe contraction table."""
    return process_digit_article(process_punctuation(strip_whitespace(text)), VIZWIZ_CONTRACTIONS)


def evalai_normalize(text: str) -> str:
    """EvalAIAnswerProcessor: lower-case, drop "," and "?", "'s" -> " 's", strip; then the VQA steps
    (whitespace, punctuation, digits/articles/contractions). "red,blue" -> "redblue", "dog's" -> "dog 's".

    (EvalAI's comma regex differs from vqaEval.py's, but commas are gone by then, so it cannot matter.)
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(text)


def vqa_accuracy(pred: str, gts: Sequence[str], identity: Sequence[Hashable] | None = None) -> float:
    """Accuracy of one raw answer against the raw human answers in the current vqaEval.py (2021 fix).

    Both sides lose newlines/tabs and outer spaces; only when the (stripped) human answers are not all
    equal are both sides normalised (:func:`vqa_normalize`), so a unanimous "2" does not match "two".
    Human i's share is min(1, #{other humans j: gts[j] == pred} / 3). vqaEval.py finds "other" humans by
    comparing the whole answer records (``item != gtAnsDatum``): ``identity[i]`` stands for human i's record
    without its answer text; None means all records differ (VQAv2's answer_id 1..10), i.e. by position.
    """
    if not gts:
        return 0.0
    gts = [strip_whitespace(g) for g in gts]
    pred = strip_whitespace(pred)
    if len(set(gts)) > 1:
        gts = [vqa_normalize(g) for g in gts]
        pred = vqa_normalize(pred)
    if identity is None:
        return soft_accuracy(pred, gts)
    records = list(zip(identity, gts, strict=True))
    accs = [min(1.0, sum(r != rec and r[1] == pred for r in records) / 3) for rec in records]
    return sum(accs) / len(accs)


def vqa_accuracy_2017(pred: str, gts: Sequence[str]) -> float:
    """The 2017 vqaEval.py: the prediction is always normalised; the raw human answers get
    ``processPunctuation`` only, and only when they disagree (leave-one-out by position)."""
    if len(set(gts)) > 1:
        gts = [process_punctuation(g) for g in gts]
    return soft_accuracy(vqa_normalize(pred), gts)


def soft_accuracy(pred: str, gts: Sequence[str]) -> float:
    """VQA accuracy of an already processed answer against processed human answers (normally 10).

    For each human i, acc_i = min(1, #{j != i: gts[j] == pred} / 3); the result is the mean of acc_i.
    With 10 humans and k of them matching: k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
    """
    if not gts:
        return 0.0
    matches = sum(g == pred for g in gts)
    # Leaving out a matching human leaves matches-1 others; leaving out any other leaves all matches.
    accs = [min(1.0, (matches - (g == pred)) / 3) for g in gts]
    return sum(accs) / len(accs)


def simple_normalize(text: str) -> str:
    """Lower-case, drop apostrophes, other punctuation -> space, drop articles, collapse spaces."""
    text = text.lower().replace("'", "")
    text = text.translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(w for w in text.split() if w not in ARTICLES)


# ---------------------------------------------------------------------------------------------- yes/no
def pope_yes_no(text: str) -> str:
    """LLaVA eval_pope.py: keep the first sentence, drop commas, split on spaces; the words
    "No"/"not"/"no" make it "no", anything else "yes" (so "NO" or "Nope" count as yes, as there)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def mme_yes_no(text: str) -> str:
    """MME calculation.py ``parse_pred_ans`` on the lower-cased answer: "yes"/"no", else "yes"/"no" within
    the first 4 characters, else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# --------------------------------------------------------------------------------------- option letters
# VLMEvalKit vlmeval/utils/matching_util.py (can_infer_option / can_infer_text / can_infer).
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_OPTION_SEPARATORS = ".()[],:;!*#{}"
# "(?i)" applies to the letter too: "the answer is a dog" reads as option A there, and so here.
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit ``can_infer_option``: the option letter an answer names, "Z" for a refusal, else None.

    The marks ``.()[],:;!*#{}`` become spaces and the answer is split on whitespace. If exactly one option
    letter of ``choices`` is a token, it is taken when its first occurrence is among the last 4 tokens; with no letter token but a "Z" token, "Z". Otherwise "answer is X" / "correct answer is **X**"
    (X in A-D, any case) anywhere in the text. (VLMEvalKit's VERBOSE=1 debugging switch is not reproduced.)
    """
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REFUSALS):
        return "Z"
    mod = answer
    for c in _OPTION_SEPARATORS:
        mod = mod.replace(c, " ")
    splits = mod.split()
    count = sum(c in splits for c in choices)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and "Z" in splits:
        return "Z"
    m = _VERBOSE_ANSWER.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit ``can_infer_text``: the one option whose lower-cased text occurs in the lower-cased answer
    (a substring test, so "cat" is found in "cats"), unless the answer is longer than twice all options'
    text together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit ``can_infer`` (its exact-matching policy): the option letter, "Z" (a refusal, always
    wrong) or None (not parsed; VLMEvalKit would then ask a ChatGPT judge, which is not reproduced)."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)
