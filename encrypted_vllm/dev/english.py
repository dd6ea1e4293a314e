"""A cheap "is this English prose?" check of a real model's output: the
verification protocol's third criterion (`test_local.py`), and the tests'.

It tells a real model's answers from what random weights produce; it does not
judge grammar, sense or facts (the offline model is tiny and often wrong).

Rules:
- Text holding U+FFFD is never English: random byte-level tokens decode to
  invalid UTF-8, and a real model's text decodes cleanly.
- Text is split on whitespace; punctuation around each piece is dropped and
  pieces left empty (list bullets, lone dashes) are ignored. Every other piece
  counts, numbers and glued fragments like ``worldd9`` included.
- English prose is made largely of function words: a share of at least
  ``COMMON_SHARE`` of the pieces must be among the ~250 common words below
  (measured: real SmolLM2 answers 0.25-0.92; random weights and random
  tokens 0.00).
- Fewer than ``MIN_PIECES`` different pieces is too little to judge, and
  fails: that also rejects a random model stuck repeating one common word
  (random weights do repeat one token: "pathologist pathologist ..."). Use
  prompts whose answers run to a sentence or more.
"""

from __future__ import annotations

import string

COMMON_SHARE = 0.2
MIN_PIECES = 4

# Written for this check: the most frequent English words, with the inflected
# forms and contractions that chat answers use most.
COMMON_WORDS = frozenset(
    """
    a able about above after again all already also although always am among an and another
    answer any are around as ask at away back be because been before being below best better
    between both but by call called can can't change come could day did didn't different do
    does doesn't don't down during each end even every example fact feel few find first
    following for from get give go going good got great had hand has have he help her here
    here's him his how however i i'd i'll i'm i've if important in include includes
    including information into is isn't it it's its just keep kind know last less let let's
    level life like little long look made make many may me means might more most much must
    my need never new no not now number of off often on once one only or order other our out
    over own part people per place please point possible problem question really right said
    same say see several she should show since small so some something still such sure
    system take tell than thank thanks that that's the their them then there there's these
    they they're thing things think this those three through time to today together too two
    under until up us use used usually various very want was way we we're well were what
    what's when where whether which while who whole why will with within without won't word
    words work world would year yes yet you you'd you'll you're your yours
    """.split()
)

# Quotes and dashes beyond ASCII that surround words in model output.
_STRIP = string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026"


def looks_like_english(text: str) -> bool:
    """True when ``text`` reads as English prose by the module's rules."""
    if "\ufffd" in text:
        return False
    pieces = _pieces(text)
    return len(set(pieces)) >= MIN_PIECES and _share(pieces) >= COMMON_SHARE


def common_share(text: str) -> float:
    """The share that ``looks_like_english`` compares with ``COMMON_SHARE``;
    for reports and for choosing the threshold."""
    return _share(_pieces(text))


def _pieces(text: str) -> list[str]:
    stripped = (piece.strip(_STRIP).lower().replace("\u2019", "'") for piece in text.split())
    return [piece for piece in stripped if piece]


def _share(pieces: list[str]) -> float:
    return sum(piece in COMMON_WORDS for piece in pieces) / len(pieces) if pieces else 0.0
