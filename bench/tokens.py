"""Counting tokens on the client side: with a local tokenizer.json (`--tokenizer`), or with the server's
llama.cpp-style POST /tokenize {"content"} -> {"tokens"} and /detokenize {"tokens"} -> {"content"}
(our server and llama.cpp's have them; shortfin, vLLM and Triton do not). Special tokens (BOS) are
never added: the counts are of the text itself."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import httpx


class TokenCounter(Protocol):
    name: str  # how the counts were made, as the JSON reports it

    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: list[int]) -> str: ...


class LocalTokenizer:
    """A Hugging Face `tokenizers` tokenizer from tokenizer.json (a file, or the folder holding it)."""

    name = "tokenizer"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        self.tokenizer = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))

    async def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    async def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class ServerTokenizer:
    """The server's POST /tokenize and /detokenize."""

    name = "tokenize_endpoint"

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client, self.base_url = client, base_url.rstrip("/")

    async def encode(self, text: str) -> list[int]:
        # llama.cpp (and ours) read "content" and "add_special"; vLLM reads "prompt" and "add_special_tokens"
        r = await self.client.post(
            f"{self.base_url}/tokenize",
            json={"content": text, "prompt": text, "add_special": False, "add_special_tokens": False},
        )
        r.raise_for_status()
        return [t if isinstance(t, int) else t["id"] for t in r.json()["tokens"]]

    async def decode(self, ids: list[int]) -> str:
        r = await self.client.post(f"{self.base_url}/detokenize", json={"tokens": ids})
        r.raise_for_status()
        body = r.json()
        return body["content"] if "content" in body else body["prompt"]

    async def works(self) -> bool:
        try:
            return bool(await self.encode("hello world")) and isinstance(await self.decode([]), str)
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return False


async def find_counter(client: httpx.AsyncClient, base_url: str, tokenizer: str | None) -> TokenCounter | None:
    """`--tokenizer` if given, else the server's /tokenize if it answers, else None."""
    if tokenizer:
        try:
            return LocalTokenizer(tokenizer)
        except Exception as e:  # tokenizers raises plain Exceptions
            raise ValueError(f"--tokenizer {tokenizer}: {e}") from e
    server = ServerTokenizer(client, base_url)
    return server if await server.works() else None
