"""Synthetic languages with a known answer: corpora whose exact next-n-token distribution is computable.

    python -m data_prep.corpus OUT.jsonl --source synthetic:RUNG[:key=value,...] [--seed S] [--tokens N]
    calm-train prepare --input OUT.jsonl --val-input OUT.val.jsonl --tokenizer OUT.tokenizer.json --out DIR \\
        --seq-len 64 --patch-size 4
    calm-train eval RUN --data DIR        # optimum_brier1..4 and optimum_brierlm beside the model's

language.py   the language (syllable tokens, a prefix-free lexicon, a word grammar), its documents, its tokenizer
rungs.py      the ladder (cycle, templates, templates_x3, templates_x10, markov300, zipf) and `build(spec, seed)`
hmm.py        the packed token stream as a hidden Markov model: the forward filter over a window and the
              exact optimal Brier-n at every chunk boundary
optimum.py    the optimum of a prepared split (`split_optimum(DIR, "val")`), per sample, for any subset
"""
