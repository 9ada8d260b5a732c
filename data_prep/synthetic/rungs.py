"""The ladder of synthetic languages, from near-deterministic to natural-text-like.

Each rung is a builder and its parameters; `build("RUNG[:key=value,...]", seed)` makes the language
(deterministic for the seed), the overrides change any parameter of the rung, e.g.
`markov300:successors=3,words=100`.

* templated grammars (`templates`): sentence templates over word classes (DET NOUN VERB ...), each
  slot a word of its class, a period ends the sentence and the document ends after a sentence with
  probability `end`.  Hidden state: the template and the slot (templates share their first classes).
  `scale` multiplies every class's size; `lengths` bounds the syllables per word; `zipf` > 0 makes
  the choice within a class skewed (p_k ~ (k+1)^-zipf), 0 uniform.
* first-order Markov chains over words (`markov`): every word has its successors (a set drawn with the
  unigram weights, Zipf with exponent `unigram`; `successors` for the most frequent word, falling as
  rank^-`successor_decay`, at least 2), successor probabilities ~ (k+1)^-`skew` in draw order; a document
  starts with a word drawn by the unigram weights and ends after any word with probability `end`.
  `lengths="rank"` gives frequent words fewer syllables (1 for the 30 most frequent, up to 4), as
  natural languages do.
"""
from __future__ import annotations

import numpy as np

from data_prep.synthetic.language import Language, LanguageError, Node

CONSONANTS = "ptkbdgmnlrsfvzhjwy"
VOWELS = "aeiou"
CODAS = "nrslmkt"
PERIOD = "."
WORD_CLASSES = {"DET": 3, "ADJ": 6, "NOUN": 12, "VERB": 8, "ADV": 4, "PREP": 4}   # a few dozen words
ENGLISH_TEMPLATES = ("DET NOUN VERB DET NOUN", "DET ADJ NOUN VERB PREP DET NOUN", "NOUN VERB ADV",
                     "DET NOUN PREP DET ADJ NOUN VERB DET NOUN")


def syllable_inventory(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct syllables (CV, then CVC), in a seeded order; at most 720."""
    cv = [c + v for c in CONSONANTS for v in VOWELS]
    cvc = [s + k for s in cv for k in CODAS]
    if n > len(cv) + len(cvc):
        raise LanguageError(f"syllables={n}: at most {len(cv) + len(cvc)} are available. Fix: ask for fewer")
    pool = cv + list(rng.permutation(cvc))[:max(0, n - len(cv))]
    return [str(s) for s in rng.permutation(pool)[:n]]


def prefix_free_lexicon(lengths: list[int], syllables: int, rng: np.random.Generator,
                        reserved: int = 0) -> list[list[int]]:
    """Words of the given syllable counts over syllables reserved..syllables-1, no word a prefix of another."""
    words, spelled, prefixes = [], set(), set()
    for length in lengths:
        for _ in range(10_000):
            word = tuple(int(s) for s in rng.integers(reserved, syllables, length))
            if word not in spelled and word not in prefixes and not any(word[:i] in spelled for i in range(1, length)):
                break
        else:
            raise LanguageError(f"cannot draw {len(lengths)} prefix-free words of lengths up to {max(lengths)} over "
                                f"{syllables - reserved} syllables. Fix: raise `syllables` or `lengths`")
        words.append(list(word))
        spelled.add(word)
        prefixes.update(word[:i] for i in range(1, length))
    return words


def templates(rng, *, scale: float = 1, lengths=(1, 2), syllables: int = 48, zipf: float = 0.0, end: float = 0.1,
              templates: tuple[str, ...] = ENGLISH_TEMPLATES, classes: dict | None = None) -> tuple:
    """A templated grammar (module docstring); returns (syllables, words, nodes, start)."""
    used = {name for t in templates for name in t.split()}
    classes = {name: max(1, round(size * scale)) for name, size in (classes or WORD_CLASSES).items() if name in used}
    inventory = [PERIOD] + syllable_inventory(syllables - 1, rng)
    sizes = list(classes.values())
    words = [[0]] + prefix_free_lexicon([int(rng.integers(lengths[0], lengths[1] + 1)) for _ in range(sum(sizes))],
                                        len(inventory), rng, reserved=1)
    members, first = {}, 1
    for name, size in classes.items():
        weights = np.arange(1, size + 1, dtype=float) ** -zipf
        members[name] = list(zip(range(first, first + size), weights / weights.sum()))
        first += size
    members[PERIOD] = [(0, 1.0)]
    slots = [t.split() + [PERIOD] for t in templates]
    # node 0: a sentence starts (a document may end here); every other node: the classes left of a sentence,
    # shared by the templates that end alike (so equal futures are one hidden state)
    suffixes = sorted({tuple(s[k:]) for s in slots for k in range(1, len(s))})
    node_of = {(): 0, **{suffix: 1 + i for i, suffix in enumerate(suffixes)}}
    nodes = [Node(end, [])] + [Node(0.0, []) for _ in suffixes]
    for template in slots:
        nodes[0].arcs.extend((w, node_of[tuple(template[1:])], (1 - end) * p / len(slots))
                             for w, p in members[template[0]])
    for suffix in suffixes:
        nodes[node_of[suffix]].arcs.extend((w, node_of[suffix[1:]], p) for w, p in members[suffix[0]])
    return inventory, words, nodes, 0


def markov(rng, *, words: int = 300, successors: int = 6, successor_decay: float = 0.0, unigram: float = 0.0,
           skew: float = 1.0, lengths=(2, 4), syllables: int = 480, end: float = 0.02) -> tuple:
    """A first-order Markov chain over words (module docstring); returns (syllables, words, nodes, start)."""
    inventory = syllable_inventory(syllables, rng)
    if lengths == "rank":
        counts = [1 if r < 30 else 2 if r < 200 else 3 if r < 700 else 4 for r in range(words)]
    else:
        counts = [int(rng.integers(lengths[0], lengths[1] + 1)) for _ in range(words)]
    lexicon = prefix_free_lexicon(counts, len(inventory), rng)
    unigram_p = np.arange(1, words + 1, dtype=float) ** -unigram
    unigram_p /= unigram_p.sum()
    nodes = [Node(0.0, [(w, 1 + w, float(p)) for w, p in enumerate(unigram_p)])]   # node 0: document start
    for rank in range(words):
        n = min(words, max(2, round(successors * (rank + 1) ** -successor_decay)))
        chosen = rng.choice(words, size=n, replace=False, p=unigram_p)
        weights = np.arange(1, n + 1, dtype=float) ** -skew
        probs = (1 - end) * weights / weights.sum()
        nodes.append(Node(end, [(int(w), 1 + int(w), float(p)) for w, p in zip(chosen, probs)]))
    return inventory, lexicon, nodes, 0


LADDER = {
    "cycle": (templates, dict(templates=("DET NOUN VERB DET ADJ NOUN",), scale=1 / 3, zipf=4.0, syllables=24),
              "near-deterministic: one sentence template, 1-4 words per slot, the first word of each slot ~94 %"),
    "templates": (templates, dict(),
                  "a templated English-like grammar of a few dozen words (37 + the period), 1-2 syllables each"),
    "templates_x3": (templates, dict(scale=3, lengths=(1, 3), syllables=160),
                     "the same templates with 3x the words per slot, 1-3 syllables each"),
    "templates_x10": (templates, dict(scale=10, lengths=(2, 4), syllables=480),
                      "the same templates with 10x the words per slot, made-up words of 2-4 syllables"),
    "markov300": (markov, dict(),
                  "a first-order Markov chain over 300 made-up words of 2-4 syllables, 6 successors each"),
    "zipf": (markov, dict(words=1000, successors=300, successor_decay=0.5, unigram=1.0, skew=0.0, lengths="rank"),
             "natural-text-like: a Markov chain over 1000 words with Zipf frequencies, frequent words short and "
             "with many successors (300 for the most frequent, ~9 for the rarest, equally likely)"),
}


def parse_spec(spec: str) -> tuple[str, dict]:
    """"RUNG[:key=value,...]" -> (rung, overrides); values are int, float or a-b ranges (lengths)."""
    rung, _, rest = spec.partition(":")
    if rung not in LADDER:
        raise LanguageError(f"synthetic:{spec}: unknown rung {rung!r}. Fix: use one of {list(LADDER)}")
    builder, defaults, _ = LADDER[rung]
    allowed = [p for p in builder.__kwdefaults__ if p not in ("templates", "classes")]
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise LanguageError(f"synthetic:{spec}: {item!r} is not key=value with a key of {allowed}")
        if "-" in value:
            low, high = value.split("-")
            overrides[key] = (int(low), int(high))
        else:
            overrides[key] = float(value) if any(c in value for c in ".e") else int(value)
    return rung, overrides


def build(spec: str, seed: int = 0) -> Language:
    """The language of a rung spec, deterministic for the seed."""
    rung, overrides = parse_spec(spec)
    builder, defaults, description = LADDER[rung]
    params = {**defaults, **overrides}
    syllables, words, nodes, start = builder(np.random.default_rng([seed, 0]), **params)
    language = Language(spec, seed, description + (f" ({spec})" if overrides else ""), syllables, words, nodes,
                        start, {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})
    language.check(f"synthetic:{spec}")
    return language
