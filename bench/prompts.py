"""The benchmark's prompts, by workload (`--workload`), or a file (JSON lines with "prompt", else one per line):

- synthetic: random words (from a fixed seed) cut to `input_len` tokens with a token counter when there is one;
- grounded: a real document (a source file of this repository) and the request to copy it, as raw completion
  text, about `input_len` tokens in all: the output is in the input (what prompt-lookup speculation wins on);
- chat: one of CHAT_QUESTIONS (open questions and writing tasks) in a plain "User: ... / Assistant:" exchange
  after one of CHAT_SYSTEMS: the output is not in the input. Their own lengths (`input_len` is not used).

Each request's `input_len` is drawn from a list of lengths (`length_mix`), seeded, so that two runs of a
comparison get the same sequence."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
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


async def synthetic_prompts(
    n: int, input_len: int | Sequence[int], seed: int | str, counter: TokenCounter | None
) -> list[Prompt]:
    """n distinct prompts (they differ from their first word, so prefix caching does not hide prefill) of
    `input_len` tokens, or of `input_len[i]` tokens for the i-th; the same seed gives the same prompts."""
    lengths = [input_len] * n if isinstance(input_len, int) else list(input_len)
    if len(lengths) != n:
        raise ValueError(f"{n} prompts, {len(lengths)} lengths")
    return await _gather(
        [lambda i=i: synthetic_prompt(random.Random(f"{seed}-{i}"), lengths[i], counter) for i in range(n)]
    )


async def _gather(makers: list[Callable[[], Awaitable[Prompt]]]) -> list[Prompt]:
    """Run the prompt makers (each may ask the server's /tokenize) at most 16 at once, in order."""
    limit = asyncio.Semaphore(16)

    async def one(make: Callable[[], Awaitable[Prompt]]) -> Prompt:
        async with limit:
            return await make()

    return list(await asyncio.gather(*(one(m) for m in makers)))


def parse_lengths(spec: str) -> list[int]:
    """`--input-len`: one length, or a comma-separated list to draw each request's from ("32,1024"; a length
    listed twice is drawn twice as often)."""
    try:
        lengths = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"{spec!r}: expected a length in tokens, or a comma-separated list of them") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"{spec!r}: lengths must be positive")
    return lengths


def length_mix(lengths: Sequence[int], n: int, seed: int | str) -> list[int]:
    """The n requests' lengths: the list repeated to n and shuffled (seeded), so that every listed length is
    used as often as the others (give or take one) when n is at least the list's length."""
    if len(set(lengths)) == 1:
        return [lengths[0]] * n
    pool = list(lengths) * math.ceil(n / len(lengths))
    random.Random(f"lengths-{seed}").shuffle(pool)
    return pool[:n]


def describe_lengths(lengths: Sequence[int]) -> str:
    """ "32 x32, 1024 x32": each length and how many requests have it."""
    return ", ".join(f"{length} x{k}" for length, k in sorted(Counter(lengths).items()))


WORKLOADS = ("synthetic", "grounded", "chat")


async def workload_prompts(
    workload: str, lengths: Sequence[int], seed: int | str, counter: TokenCounter | None
) -> list[Prompt]:
    """One prompt per entry of `lengths` (each request's length in tokens; chat: only their number counts)."""
    if workload == "synthetic":
        return await synthetic_prompts(len(lengths), lengths, seed, counter)
    if workload == "grounded":
        return await grounded_prompts(lengths, seed, counter)
    if workload == "chat":
        return await chat_prompts(len(lengths), seed, counter)
    raise ValueError(f"unknown workload {workload!r} (one of {', '.join(WORKLOADS)})")


async def _count(text: str, counter: TokenCounter | None) -> int:
    """Tokens in `text`: the counter's, else an estimate of CHARS_PER_TOKEN characters a token."""
    if counter is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return len(await counter.encode(text))


# grounded: the documents are this repository's Python sources (sorted, so that a seed picks the same ones on
# every machine with the same tree; they change with the code, so compare runs made on one tree)
ROOT = Path(__file__).resolve().parents[1]
DOCUMENT_GLOBS = ("models/*.py", "serve/**/*.py", "export/*.py", "compile/*.py", "sharding/*.py", "bench/*.py")
CHARS_PER_TOKEN = 4  # without a token counter
MIN_DOCUMENT_CHARS = 2000


def documents(root: Path = ROOT) -> list[tuple[str, str]]:
    """(path relative to `root`, text) of the grounded workload's documents: Python sources of at least
    MIN_DOCUMENT_CHARS characters, none generated (protobuf stubs) and none holding a Markdown fence (which
    would end the prompt's own)."""
    paths = sorted({p for pattern in DOCUMENT_GLOBS for p in root.glob(pattern) if "_pb2" not in p.name})
    docs = []
    for p in paths:
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(text) >= MIN_DOCUMENT_CHARS and "```" not in text:
            docs.append((p.relative_to(root).as_posix(), text))
    return docs


def grounded_text(path: str, body: str) -> str:
    """The grounded prompt: the document in a fence, then the start of its copy, as raw completion text (a base
    or instruct model alike continues by copying)."""
    return f"Here is the file {path}.\n```python\n{body}\n```\nThe same file, copied exactly:\n```python\n"


async def grounded_prompt(
    rng: random.Random, path: str, text: str, input_len: int, counter: TokenCounter | None
) -> Prompt:
    """The document from a line drawn at random (one that leaves enough of it when it is long), cut at a line
    end to the most whole lines whose prompt is at most `input_len` tokens (when even the first line is too
    long: as much of it as fits)."""
    need = CHARS_PER_TOKEN * input_len
    starts = [0] + [m.end() for m in re.finditer("\n", text) if len(text) - m.end() >= need]
    start = rng.choice(starts)
    lines = text[start : start + 3 * need].splitlines()[: 2 * input_len] or [""]  # enough: a line is a token or more

    async def size(k: int) -> int:
        return await _count(grounded_text(path, "\n".join(lines[:k])), counter)

    lo, hi = 1, len(lines)  # the largest k with size(k) <= input_len (sizes grow with k), 1 if none
    if await size(hi) <= input_len:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if await size(mid) <= input_len:
            lo = mid
        else:
            hi = mid - 1
    if lo == 1 and await size(1) > input_len:  # one line too long already: its head, cut by characters
        first, a, b = lines[0], 0, len(lines[0])
        while a < b:
            mid = (a + b + 1) // 2
            lines[0] = first[:mid]
            a, b = (mid, b) if await size(1) <= input_len else (a, mid - 1)
        lines[0] = first[:a]
    prompt = grounded_text(path, "\n".join(lines[:lo]))
    return Prompt(prompt, None if counter is None else await _count(prompt, counter))


async def grounded_prompts(
    lengths: Sequence[int], seed: int | str, counter: TokenCounter | None, root: Path = ROOT
) -> list[Prompt]:
    """One grounded prompt per length: each request takes, of the documents long enough for its length (about
    CHARS_PER_TOKEN characters a token; all when none is), the least used so far, the first in a seeded order
    of ties; each from its own seeded start (a document met again starts at another line)."""
    docs = documents(root)
    if not docs:
        raise ValueError(f"grounded workload: no documents under {root} ({', '.join(DOCUMENT_GLOBS)})")
    order = random.Random(f"grounded-{seed}").sample(docs, len(docs))
    uses: Counter[str] = Counter()
    picks = []
    for length in lengths:
        path, text = min([d for d in order if len(d[1]) >= CHARS_PER_TOKEN * length] or order, key=lambda d: uses[d[0]])
        uses[path] += 1
        picks.append((path, text))

    def maker(i: int) -> Callable[[], Awaitable[Prompt]]:
        path, text = picks[i]
        return lambda: grounded_prompt(random.Random(f"grounded-{seed}-{i}"), path, text, lengths[i], counter)

    return await _gather([maker(i) for i in range(len(lengths))])


# chat: free-form requests whose answer is not in the prompt
CHAT_SYSTEMS = [
    "A conversation between a curious user and a helpful assistant.",
    "The assistant answers clearly and in some detail.",
    "A chat with a friendly, knowledgeable assistant.",
    "The following is a conversation with an AI assistant that explains things well.",
    "A user asks questions; the assistant gives thoughtful, complete answers.",
    "Transcript of a helpful assistant talking with a user.",
]
CHAT_QUESTIONS = [
    "Why is the sky blue?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation, and how do central banks respond to it?",
    "Explain how a bicycle stays upright when it moves.",
    "Give me some tips for learning a new language as an adult.",
    "Write a poem about the first snow of winter.",
    "What was life like in ancient Rome for an ordinary family?",
    "How do vaccines train the immune system?",
    "Describe a perfect weekend in the mountains.",
    "What is the difference between weather and climate?",
    "Write a letter to a friend you have not seen in ten years.",
    "How does a refrigerator keep food cold?",
    "What should I think about before adopting a dog?",
    "Explain the rules of chess to a beginner.",
    "Why do we dream, according to current research?",
    "Plan a three-day trip to Kyoto for someone who loves food and gardens.",
    "What makes a good leader?",
    "Describe how bread rises and why kneading matters.",
    "Write a dialogue between a cat and a robot vacuum.",
    "How did the printing press change Europe?",
    "What are black holes, and how do we know they exist?",
    "Give advice to someone starting their first job.",
    "Explain why the seasons change during the year.",
    "Write a product description for a solar-powered backpack.",
    "What are the pros and cons of working from home?",
    "How do bees make honey?",
    "Tell me about the history of the Olympic Games.",
    "Describe the water cycle in simple terms.",
    "What would a city designed for pedestrians look like?",
    "Write a speech for the opening of a small town library.",
]


def chat_text(system: str, question: str) -> str:
    return f"{system}\n\nUser: {question}\nAssistant:"


async def chat_prompts(n: int, seed: int | str, counter: TokenCounter | None) -> list[Prompt]:
    """n chat prompts: the questions in a seeded order, each time after another system line, so that the first
    len(CHAT_SYSTEMS) * len(CHAT_QUESTIONS) (180) are distinct; later ones repeat them."""
    questions = list(CHAT_QUESTIONS)
    random.Random(f"chat-{seed}").shuffle(questions)
    texts = []
    for i in range(n):
        rnd, k = divmod(i % (len(CHAT_SYSTEMS) * len(questions)), len(questions))
        texts.append(chat_text(CHAT_SYSTEMS[(rnd + k) % len(CHAT_SYSTEMS)], questions[k]))
    if counter is None:
        return [Prompt(t, None) for t in texts]

    async def counted(t: str) -> Prompt:
        return Prompt(t, await _count(t, counter))

    return await _gather([lambda t=t: counted(t) for t in texts])


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
