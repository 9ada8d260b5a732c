"""A synthetic language: syllable tokens, a prefix-free lexicon of words, and a word grammar.

The grammar is a probabilistic finite automaton over words: each node has arcs (word, next node,
probability) and a probability `end` of ending the document there (arcs + end sum to 1).  A
document starts at node `start` (it cannot end before its first word: the start arcs are
renormalised without `end`), walks arcs, writing each word's syllables, and ends at a node with
probability `end`.  Templated grammars (nodes = the slots of sentence templates) and first-order
Markov chains over words (nodes = the previous word) are both of this form (data_prep/synthetic/rungs.py).

Text is the syllables separated by single spaces, so the language's own tokenizer (an HF `tokenizers`
WordLevel model over the syllables with a WhitespaceSplit pre-tokenizer) gives exactly the token ids
the grammar emits: token ids 0, 1, 2 are EOS (`<|endoftext|>`), PAD (`<pad>`) and `<unk>`, syllable i
is token 3 + i.  Words are written without a separator: the lexicon is prefix-free, so a document
parses into words in one way, and a chunk of K tokens can start or end inside a word, as BPE tokens do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

FORMAT = "calm-train synthetic language"
VERSION = 1
EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
SPECIALS = (EOS, PAD, UNK)
VOCAB_MULTIPLE = 16


class LanguageError(ValueError):
    """A language file that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass
class Node:
    end: float                                   # probability that the document ends here
    arcs: list[tuple[int, int, float]]           # (word, next node, probability)


@dataclasses.dataclass
class Language:
    rung: str                     # the spec it was built from, e.g. "markov300" or "markov300:successors=3"
    seed: int
    description: str
    syllables: list[str]          # token strings; syllable i is token id len(SPECIALS) + i
    words: list[list[int]]        # syllable indices of each word (a prefix-free set)
    nodes: list[Node]
    start: int
    params: dict = dataclasses.field(default_factory=dict)

    def check(self, where: str = "language") -> None:
        """Probabilities sum to 1 at every node, indices are in range, the lexicon is prefix-free."""
        for i, node in enumerate(self.nodes):
            total = node.end + sum(p for _, _, p in node.arcs)
            if abs(total - 1) > 1e-9 or node.end < 0 or any(p <= 0 for _, _, p in node.arcs):
                raise LanguageError(f"{where}: node {i}: end + arc probabilities = {total}, not 1 (or one is <= 0). "
                                    "Fix: rebuild the language with `python -m data_prep.corpus --source synthetic:RUNG`")
            if any(not 0 <= w < len(self.words) or not 0 <= v < len(self.nodes) for w, v, _ in node.arcs):
                raise LanguageError(f"{where}: node {i} has an arc to a word or node that does not exist")
        if not self.nodes[self.start].arcs:
            raise LanguageError(f"{where}: the start node {self.start} has no arcs: documents would be empty")
        spelled = sorted(tuple(w) for w in self.words)
        for a, b in zip(spelled, spelled[1:]):
            if b[:len(a)] == a:
                raise LanguageError(f"{where}: word {a} is a prefix of word {b}: the lexicon must be prefix-free")

    # ---- documents --------------------------------------------------------------------------------------
    def sample_documents(self, num_tokens: int) -> list[list[int]]:
        """Documents (lists of word indices) until they hold at least num_tokens syllable tokens; the same
        documents for the same language and seed (the stream [seed, 1]; rungs.py builds from [seed, 0])."""
        rng = np.random.default_rng([self.seed, 1])
        cdfs = [np.cumsum([p for _, _, p in node.arcs]) for node in self.nodes]
        lengths = [len(w) for w in self.words]
        docs, total = [], 0
        while total < num_tokens:
            node, doc = self.start, []
            while True:
                arcs, cdf = self.nodes[node].arcs, cdfs[node]
                u = rng.random() * (cdf[-1] if not doc else 1.0)   # the first word: start arcs without `end`
                k = int(np.searchsorted(cdf, u, side="right"))
                if k == len(arcs):
                    break                                          # the document ends here
                word, node, _ = arcs[k]
                doc.append(word)
                total += lengths[word]
            docs.append(doc)
        return docs

    def text(self, doc: list[int]) -> str:
        return " ".join(self.syllables[s] for w in doc for s in self.words[w])

    def token_ids(self, doc: list[int]) -> list[int]:
        return [len(SPECIALS) + s for w in doc for s in self.words[w]]

    # ---- the tokenizer ----------------------------------------------------------------------------------
    def tokenizer_json(self) -> str:
        """The language's tokenizer.json: WordLevel over SPECIALS + syllables + reserved tokens (never emitted: they
        round the vocabulary up to a multiple of VOCAB_MULTIPLE, so tensor parallelism can split it), WhitespaceSplit."""
        from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
        size = len(SPECIALS) + len(self.syllables)
        reserved = [f"<|reserved_{i}|>" for i in range(-size % VOCAB_MULTIPLE)]
        vocab = {token: i for i, token in enumerate([*SPECIALS, *self.syllables, *reserved])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens([AddedToken(t, special=True) for t in [*SPECIALS, *reserved]])
        return tok.to_str()

    def tokenizer_sha256(self) -> str:
        return hashlib.sha256(self.tokenizer_json().encode()).hexdigest()

    # ---- files ------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        tree = {"format": FORMAT, "version": VERSION, "rung": self.rung, "seed": self.seed,
                "description": self.description, "params": self.params,
                "tokenizer_sha256": self.tokenizer_sha256(), "special_tokens": list(SPECIALS),
                "syllables": self.syllables, "words": self.words, "start": self.start,
                "nodes": [{"end": n.end, "arcs": [list(a) for a in n.arcs]} for n in self.nodes]}
        return json.dumps(tree, separators=(",", ":")) + "\n"


def read_language(path) -> Language:
    """A language file written by `python -m data_prep.corpus --source synthetic:RUNG`, checked."""
    path = pathlib.Path(path)
    try:
        tree = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LanguageError(f"{path}: cannot be read as a language file ({err}). Fix: write it again with "
                            "`python -m data_prep.corpus OUT --source synthetic:RUNG`") from err
    if not isinstance(tree, dict) or tree.get("format") != FORMAT or tree.get("version") != VERSION:
        raise LanguageError(f"{path}: not a {FORMAT} file of version {VERSION}. Fix: write it again with "
                            "`python -m data_prep.corpus OUT --source synthetic:RUNG`")
    language = Language(tree["rung"], tree["seed"], tree["description"], tree["syllables"], tree["words"],
                        [Node(n["end"], [(int(w), int(v), float(p)) for w, v, p in n["arcs"]]) for n in tree["nodes"]],
                        tree["start"], tree.get("params", {}))
    language.check(str(path))
    if tree.get("tokenizer_sha256") != language.tokenizer_sha256():
        raise LanguageError(f"{path}: its tokenizer_sha256 does not match its syllables (edited, or written by "
                            "another tokenizers version). Fix: write it again")
    return language


def beside(corpus, suffix: str) -> pathlib.Path:
    """OUT.<suffix> beside a corpus OUT.jsonl (or OUT): language.json, tokenizer.json, val.jsonl."""
    corpus = pathlib.Path(corpus)
    return corpus.with_name(f"{corpus.name.removesuffix('.jsonl')}.{suffix}")


def language_path(corpus) -> pathlib.Path:
    return beside(corpus, "language.json")


def write_language_corpus(out, language: Language, num_tokens: int, val_tokens: int) -> dict:
    """OUT (the training documents, JSON lines), OUT.val.jsonl (held-out documents, drawn after them: both
    i.i.d.), OUT.language.json and OUT.tokenizer.json; returns the counts."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = language.sample_documents(num_tokens + val_tokens)
    cut, total = 0, 0
    while cut < len(docs) and total < num_tokens:
        total += len(language.token_ids(docs[cut]))
        cut += 1
    stats = {"vocab_size": -(-(len(SPECIALS) + len(language.syllables)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
             "lexicon": len(language.words)}
    for path, part in ((out, docs[:cut]), (beside(out, "val.jsonl"), docs[cut:])):
        with open(path, "w", encoding="utf-8") as f:
            for doc in part:
                f.write(json.dumps({"text": language.text(doc)}) + "\n")
        stats[str(path)] = {"documents": len(part), "tokens": sum(len(language.token_ids(d)) for d in part)}
    language_path(out).write_text(language.to_json())
    beside(out, "tokenizer.json").write_text(language.tokenizer_json())
    return stats
