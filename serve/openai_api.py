"""OpenAI-compatible routes: not written yet (issue 5)."""

from fastapi import FastAPI


def add_openai_routes(app: FastAPI, engine_ref: dict) -> None:
    return None
