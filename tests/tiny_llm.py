"""A tiny BERT built from a `transformers` config in code and saved as a local model folder, so the default
`text.mode: llm` path (encode -> cached vectors -> text basis -> llm lookup -> checkpoint round trip) runs in the
suite without the shipped MiniLM and without any download. Used by tests/conftest.py (`tiny_llm`) and the text
tests (`build_tiny_bert`)."""
from __future__ import annotations

import collections
import csv
import re
from pathlib import Path
from typing import Iterable, List

REPO = Path(__file__).resolve().parents[1]
MOVIES_CSV = REPO / "recsys" / "datasets" / "ml-latest-small" / "movies.csv"


def movielens_words(limit: int = 600) -> List[str]:
    """The most frequent lowercase words of the shipped MovieLens titles and genres: a vocabulary under which
    the titles tokenise to distinct ids (with a toy vocabulary they would all be [UNK] and encode alike)."""
    counts: collections.Counter = collections.Counter()
    with open(MOVIES_CSV, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            counts.update(re.findall(r"[a-z]+|\d+", f"{row['title']} {row['genres']}".lower()))
    return [w for w, _ in counts.most_common(limit)]


def build_tiny_bert(folder: Path, seed: int = 0, words: Iterable[str] = (), hidden: int = 32) -> Path:
    """Random 2-layer BERT of width `hidden` with a WordPiece vocabulary of `words`, saved to `folder`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(words))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
