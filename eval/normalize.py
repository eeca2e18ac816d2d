"""Answer normalisation and answer parsing shared by the benchmark tasks.

* :func:`process_punctuation` / :func:`process_digit_article`: a line-by-line port of the official VQA
  evaluation (GT-Vision-Lab/VQA ``vqaEval.py``, latest version), quirks included.
* :func:`evalai_normalize`: the EvalAI/MMF answer processor that LLaVA applies before uploading VQAv2 and
  VizWiz answers and that the TextVQA (M4C) evaluator applies to both sides.
* :func:`soft_accuracy`: VQA accuracy, min(1, #matching humans / 3) averaged over the leave-one-out subsets.
* :func:`pope_yes_no`, :func:`mme_yes_no`: yes/no parsing of LLaVA's eval_pope.py and MME's calculation.py.
* :func:`extract_letter`: a multiple-choice option letter from free text (MMBench).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence

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
# The official look-behind is mistyped ("(?!<=\d)" is a look-*ahead* for "<="+digit), so in effect a
# period is dropped unless a digit follows it ("3.5" stays, "two." -> "two"). Kept as is for fidelity.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the flag lands in `count`, so at most 32 periods go.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


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


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """What the official evaluation does to a predicted answer before comparing it to the human answers."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def evalai_normalize(text: str) -> str:
    """EvalAIAnswerProcessor (MMF/M4C): lower-case, drop "," and "?", split "'s", then as :func:`vqa_normalize`.

    (EvalAI's comma regex differs from the official one, but commas are gone by then, so it cannot matter.)
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(text)


def soft_accuracy(pred: str, gts: Sequence[str]) -> float:
    """VQA accuracy of a normalised answer against the human answers (normally 10).

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
_LETTER_ALONE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")  # "B", "b", "B.", "(B)", "B)"
_LETTER_LEAD = re.compile(r"^\(?([A-Z])(?:\)|[.:])(?:\s|$)")  # "B. cat", "(B) cat", "B: cat"
# "The answer is B", "answer: (C)", "Answer is option D"; the letter itself must be upper-case so that
# "the answer is a dog" does not read as option A.
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*(?:(?i:option)\s*)?\(?([A-Z])\b(?![a-z'])")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def extract_letter(text: str, options: Sequence[str], letters: str = "ABCDEFGHIJ") -> str | None:
    """The option letter a free-text answer picks, or None when it cannot be told.

    Tried in order: a bare letter ("B", "B.", "(B)"); a leading "B." / "(B)"; "the answer is B"; a single
    distinct "(B)" in the text; the answer equal to one option's text; one option's text occurring in the
    answer. ``options`` are the option texts in letter order; letters beyond them never match.
    """
    valid = letters[: len(options)]
    s = text.strip()
    for pat in (_LETTER_ALONE, _LETTER_LEAD):
        m = pat.match(s)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
    m = _ANSWER_IS.search(s)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    found = {c for c in _PAREN_LETTER.findall(s) if c in valid}
    if len(found) == 1:
        return found.pop()
    norm = simple_normalize(s)
    texts = [simple_normalize(o) for o in options]
    exact = [valid[i] for i, t in enumerate(texts) if t and t == norm]
    if len(exact) == 1:
        return exact[0]
    contained = [valid[i] for i, t in enumerate(texts) if t and re.search(rf"\b{re.escape(t)}\b", norm)]
    return contained[0] if len(contained) == 1 else None
