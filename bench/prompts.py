"""The benchmark's prompts: synthetic ones of `input_len` tokens (random words from a fixed seed, cut to
length with a token counter when there is one), or a file (JSON lines with "prompt", else one per line)."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .tokens import TokenCounter

WORDS = """the of and to in is was he for it with as his on be at by had are but from or have an they which one
you were her all she there would their we him been has when who will more no if out so said what up its about
into than them can only other new some could time these two may then do first any my now such like our over
man me even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come since
against go came right used take three states himself few house use during without again place american around
however home small found thought went say part once general high upon school every does got united left number
course war until always away something fact though water less public put think almost hand enough far took head
yet government system better set told nothing night end why called eyes find going look asked later knew point
next program city business give group toward young days let room president side social given present several
order national possible rather second face per among form important often things looked early white case john
become large big need four within felt along children saw best church ever least power development light seemed
family interest want members mind country area others done turned although open god service problem certain kind
different thing began door help means sense whole matter perhaps itself york times law human line above name
example action company hands local show whether five history gave today either act feet across taken past quite
anyone seen having death experience body word half really week field car words already information tell together
college shall money period held keep sure free seems real probably behind miss political air question making
office brought whose special heard major problems ago became federal moment study available known result street
economic boy position reason change south board individual job areas society west close turn love community true
court force full seem am wife age policy voice""".split()


@dataclass
class Prompt:
    text: str
    tokens: int | None  # counted without special tokens; None: no token counter


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def synthetic_prompt(rng: random.Random, input_len: int, counter: TokenCounter | None) -> Prompt:
    """`input_len` tokens of random words. Every word is at least one token, so `input_len` words are
    enough; the token ids are cut to length and decoded, and the cut moves until the text encodes to
    exactly `input_len` tokens (a word cut in two may encode differently), 8 tries at most."""
    text = _words(rng, input_len)
    if counter is None:
        return Prompt(text, None)
    ids = await counter.encode(text)
    best = Prompt(text, len(ids))
    cut = input_len
    for _ in range(8):
        cut = max(1, min(cut, len(ids)))
        piece = await counter.decode(ids[:cut])
        n = len(await counter.encode(piece))
        if abs(n - input_len) < abs(best.tokens - input_len):
            best = Prompt(piece, n)
        if n == input_len:
            break
        cut += input_len - n
    return best


async def synthetic_prompts(n: int, input_len: int, seed: int | str, counter: TokenCounter | None) -> list[Prompt]:
    """n distinct prompts (they differ from their first word, so prefix caching does not hide prefill);
    the same seed gives the same prompts."""
    rngs = [random.Random(f"{seed}-{i}") for i in range(n)]
    limit = asyncio.Semaphore(16)

    async def one(rng: random.Random) -> Prompt:
        async with limit:
            return await synthetic_prompt(rng, input_len, counter)

    return list(await asyncio.gather(*(one(r) for r in rngs)))


def read_prompts_file(path: str | Path) -> list[str]:
    """JSON lines with a "prompt" string, or else plain text with one prompt per line (blank lines skipped)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        records = [json.loads(line) for line in lines]
        if records and all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in records):
            return [r["prompt"] for r in records]
    except json.JSONDecodeError:
        pass
    return lines


async def file_prompts(path: str | Path, n: int, counter: TokenCounter | None) -> list[Prompt]:
    """The file's first n prompts, cycled when it holds fewer, with their token counts."""
    texts = read_prompts_file(path)
    if not texts:
        raise ValueError(f"{path}: no prompts")
    chosen = [texts[i % len(texts)] for i in range(n)]
    if counter is None:
        return [Prompt(t, None) for t in chosen]
    counts = await asyncio.gather(*(counter.encode(t) for t in chosen))
    return [Prompt(t, len(ids)) for t, ids in zip(chosen, counts)]


def json_schemas(n: int, seed: int | str) -> list[dict]:
    """`n` distinct JSON schemas for a structured-output workload (each request gets one, cycled): objects of
    named strings, bounded numbers, enums, a nested object and an array long enough that a model fills its
    output budget inside the structure (so constrained and plain runs generate alike many tokens)."""
    rng = random.Random(f"schemas-{seed}")
    schemas = []
    for i in range(n):
        names = rng.sample(WORDS, 6)
        props: dict = {
            names[0]: {"type": "string", "maxLength": rng.choice([16, 32, 64])},
            names[1]: {"type": "integer", "minimum": 0, "maximum": rng.choice([10, 1000, 10**6])},
            names[2]: {"enum": rng.sample(WORDS, 3)},
            names[3]: {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "boolean"}},
                "required": ["a", "b"],
            },
            names[4]: {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 40},
        }
        schemas.append(
            {
                "title": f"record{i}",
                "type": "object",
                "properties": props,
                "required": list(props),
                "additionalProperties": False,
            }
        )
    return schemas
