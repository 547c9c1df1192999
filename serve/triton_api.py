"""Triton / TensorRT-LLM style routes: not written yet."""

from fastapi import FastAPI


def add_triton_routes(app: FastAPI, engine_ref: dict) -> None:
    return None
