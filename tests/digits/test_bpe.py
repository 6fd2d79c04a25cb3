import json

from transformers import CLIPTokenizer

from guardtune.digits.bpe import learn_merges, write_clip_tokenizer
from guardtune.digits.dataset import NUMBER_WORDS, prompt_for
from guardtune.resolve import EMBEDDED_DIR


def test_learn_merges_is_greedy_and_deterministic():
    from collections import Counter

    words = Counter({"low": 5, "lower": 2, "newest": 6})
    merges = learn_merges(words, 10)
    assert merges == learn_merges(words, 10)
    assert merges[0] in {("l", "o"), ("o", "w"), ("e", "s"), ("s", "t</w>"), ("w", "e")}


def test_written_tokenizer_loads_in_clip_format(tmp_path):
    size = write_clip_tokenizer(tmp_path, model_max_length=32)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == size
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer.model_max_length == 32
    assert len(tokenizer) == size
    assert write_clip_tokenizer(tmp_path / "again", 32) == size  # reproducible


def test_embedded_tokenizer_covers_real_words():
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_DIR / "tokenizer")
    unknown = tokenizer.unk_token_id
    for text in [prompt_for(d) for d in range(10)] + ["a photo of a famous painter", "bold ink"]:
        ids = tokenizer(text).input_ids[1:-1]
        assert unknown not in ids, text
        # Whole words, not letters: the caption vocabulary was merged into word tokens.
        assert len(ids) == len(text.split()), (text, tokenizer.convert_ids_to_tokens(ids))
    digit_ids = {tokenizer(w).input_ids[1] for w in NUMBER_WORDS}
    assert len(digit_ids) == 10
    # Words outside the corpus still tokenize, into subwords rather than unknowns.
    ids = tokenizer("zebra").input_ids[1:-1]
    assert len(ids) > 1 and unknown not in ids
