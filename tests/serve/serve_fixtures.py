"""Fixtures the tour guide's tests import: tiny models whose weights make them talk (the session
fixtures' own weights repeat one token, which would let decoding and streaming bugs pass unseen), a
system prompt file, and `TourModel`s over them."""

from __future__ import annotations

import pytest

from conftest import chatty_copy, one_torch_thread

SYS = "You are Wren, a careful tour guide."


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def chatty_llama(llama_model, tmp_path_factory):
    """A 2-block Llama-style model with a chat template (the 'main' model)."""
    return chatty_copy(llama_model, tmp_path_factory.mktemp("chatty-llama"), 2)


@pytest.fixture(scope="session")
def chatty_qwen3(qwen3_model, tmp_path_factory):
    """A 3-block Qwen3 without a chat template (the 'compare' model: the plain prompt format)."""
    return chatty_copy(qwen3_model, tmp_path_factory.mktemp("chatty-qwen3"), 3)


@pytest.fixture(scope="session")
def system_prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("sys") / "system_prompt.md"
    p.write_text(SYS + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def engines(chatty_llama, chatty_qwen3):
    from tourray.serve.engine import TourModel

    return {"main": TourModel(str(chatty_llama), SYS, name="main"),
            "compare": TourModel(str(chatty_qwen3), SYS, name="compare", max_batch_size=4, batch_wait_ms=200)}
