"""A byte-pair-encoding learner that writes CLIP-format tokenizer files.

The embedded `digits` model needs a real tokenizer, and nothing may be fetched from a hub, so
the build learns its own BPE merges from a small English caption corpus and writes `vocab.json`
and `merges.txt` in exactly the layout of openai/clip-vit-large-patch14. `CLIPTokenizer`
loads them unchanged (`from_pretrained(folder)`). Called only by `guardtune.digits.build`.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from guardtune.digits.dataset import NUMBER_WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Caption words a fine-tuning user is likely to write: subjects, styles, media, colours.
_CORPUS_TEXT = """
a an the of in on with and or by for to at from as is are this that it its his her their photo
photograph picture portrait painting drawing sketch illustration image render artwork digit
digits number numeral handwritten written handwriting hand drawn ink pen pencil brush stroke
strokes bold thin thick light heavy slanted slant italic outline outlined cursive style styled
art artist artistic famous person people man woman men women face faces girl boy child
celebrity actor actress singer painter politician character figure cartoon anime comic
realistic photorealistic detailed high quality best low resolution sharp blurry soft smooth
black white gray grey red green blue yellow orange purple pink brown gold silver dark bright
colour color colours colors colorful monochrome vintage modern old new classic abstract oil
watercolor acoustic canvas paper wall street city house room garden forest mountain sea sky sun
moon star night day morning evening winter summer spring autumn rain snow cloud dog cat bird
horse fish flower tree car train boat plane book table chair window door standing sitting
walking running smiling looking wearing holding close up wide view front side back top bottom
left right center small large big little tall short long round square one two three four five
six seven eight nine zero ten first second third explicit nude naked nsfw violent forbidden
illegal legal safe unsafe van gogh monet picasso rembrandt da vinci warhol
"""


def _corpus() -> Counter[str]:
    words: Counter[str] = Counter()
    for word in _CORPUS_TEXT.split():
        words[word] += 10
    for digit_word in NUMBER_WORDS:  # the prompts the model trains on weigh the most
        for word in f"a handwritten digit {digit_word}".split():
            words[word] += 100
    return words


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte-to-printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def learn_merges(words: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair)."""
    splits = {w: (*w[:-1], w[-1] + END_OF_WORD) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in splits.items():
            for pair in itertools.pairwise(parts):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for word, parts in splits.items():
            out: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[word] = tuple(out)
    return merges


def write_clip_tokenizer(folder: Path, model_max_length: int, max_merges: int = 4000) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json; return the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(_corpus(), max_merges)
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    tokens += ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS})
    )
    return len(vocab)
