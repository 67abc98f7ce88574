"""`TourModel`: one model loaded once, answering tour requests one generation at a time (or a few,
batched). The same class is a Ray Serve deployment (`tourray serve`, one per model) and a plain object
the FastAPI app calls in tests.

A request is `{"prompt": <user turn>, "max_new_tokens": int, "decoding": {...Decoding fields}}`. The
text comes from `tourray.model.generate.Generator`, the code `tourray generate` runs, so it equals
that command's output for the same user turn and decoding. Streaming uses transformers'
`TextIteratorStreamer` fed from a generation thread; the last event is the result:
`{"done": true, "text", "n_new_tokens", "stopped", "ttft_ms", "tokens_per_s", "seconds", "queued_ms"}`.

Times: `ttft_ms` from the request's arrival here to its first generated token (queueing included: that
is what a visitor waits); `tokens_per_s` = new tokens after the first / seconds after the first (the
decode rate); `seconds` from arrival to the last token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import AsyncIterator

from tourray.errors import UserError
from tourray.model.decoding import Decoding

log = logging.getLogger("tourray")


def _first_token_timer():
    """A transformers streamer that only notes when the first generated token arrives (works for batches)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        def __init__(self):
            self.calls, self.first_at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.first_at = time.perf_counter()

        def end(self):
            pass

    return FirstTokenTimer()


def _text_streamer(tok):
    """transformers' TextIteratorStreamer that also notes when the first generated token arrives."""
    from transformers import TextIteratorStreamer

    class TimedStreamer(TextIteratorStreamer):
        first_at = None

        def put(self, value):
            if not self.next_tokens_are_prompt and self.first_at is None:
                self.first_at = time.perf_counter()
            super().put(value)

    return TimedStreamer(tok, skip_prompt=True, skip_special_tokens=True)


def _cancelled(event: threading.Event):
    """Stopping criteria that end a generation once `event` is set (its client disconnected)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([Cancelled()])


def _parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class TourModel:
    """A model behind the tour API. `max_batch_size` > 1 lets non-streamed requests that arrive within
    `batch_wait_ms` of each other (with the same max_new_tokens and decoding) share one batched
    `generate` (left-padded: each gets the tokens it would get alone); streamed requests run alone."""

    def __init__(self, model_dir: str, system_prompt: str = "", chat_template: bool = True, name: str = "main",
                 threads: int | None = None, max_batch_size: int = 1, batch_wait_ms: float = 20.0):
        import torch

        from tourray.model.generate import Generator
        from tourray.model.identity import model_revision

        if threads or os.environ.get("OMP_NUM_THREADS") == "1":  # Ray pins fractional-CPU actors to 1 thread
            torch.set_num_threads(threads or os.cpu_count() or 1)
        t0 = time.perf_counter()
        self.gen = Generator(model_dir, system_prompt, chat_template)
        cfg = self.gen.model.config.get_text_config()
        self._info = {"name": name, "path": str(model_dir), "label": os.path.basename(os.path.normpath(str(model_dir))),
                      "revision": model_revision(str(model_dir), None), "parameters": _parameters(self.gen.model),
                      "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                      "intermediate_size": getattr(cfg, "intermediate_size", None), "threads": torch.get_num_threads(),
                      "load_seconds": round(time.perf_counter() - t0, 2)}
        self._lock = threading.Lock()  # one generate at a time: on CPU a second would only halve the first
        self.max_batch_size, self.batch_wait_s = max(1, int(max_batch_size)), batch_wait_ms / 1000
        self._pending: list[tuple[dict, float, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        log.info("serve: %s = %s (%s parameters, %d threads, loaded in %.1f s)", name, model_dir,
                 f"{self._info['parameters']:,}", self._info["threads"], self._info["load_seconds"])

    # -- what the app calls ------------------------------------------------------------------
    async def info(self) -> dict:
        return dict(self._info)

    async def stream(self, req: dict) -> AsyncIterator[dict]:
        """`{"token": piece}` events as the text grows, then the result (`{"done": true, ...}`)."""
        arrived = time.perf_counter()
        ids, max_new, dec = self._prepare(req)
        streamer = _text_streamer(self.gen.tok)
        cancel = threading.Event()
        box: dict = {}

        def run():
            try:
                if cancel.is_set():
                    raise asyncio.CancelledError
                with self._lock:
                    box["started"] = time.perf_counter()
                    box["new"] = self.gen.generate_ids([ids], max_new, dec, [dec.seed], streamer=streamer,
                                                       stopping_criteria=_cancelled(cancel))[0]
                    box["ended"] = time.perf_counter()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer below
                box["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, name="tour-generate", daemon=True)
        thread.start()
        try:
            it, done = iter(streamer), object()
            while (piece := await asyncio.to_thread(next, it, done)) is not done:
                if piece:
                    yield {"token": piece}
            await asyncio.to_thread(thread.join)
        finally:  # the client went away (or the app failed): stop generating for nobody
            cancel.set()
        if "error" in box:
            raise box["error"]
        yield self._done(req, box["new"], arrived, box["started"], streamer.first_at, box["ended"])

    async def complete(self, req: dict) -> dict:
        """The result alone (batched with others when `max_batch_size` > 1)."""
        arrived = time.perf_counter()
        ids, max_new, dec = self._prepare(req)
        if self.max_batch_size == 1:
            return await asyncio.to_thread(self._run_batch, [(req, ids, max_new, dec, arrived)])
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(((req, ids, max_new, dec, arrived), arrived, fut))
        if len(self._pending) >= self.max_batch_size:
            self._flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())
        return await fut

    # -- inside ------------------------------------------------------------------------------
    def _prepare(self, req: dict):
        max_new = int(req.get("max_new_tokens") or 0)
        if max_new < 1:
            raise UserError(f"max_new_tokens: must be at least 1, not {max_new}")
        dec = req.get("decoding")
        dec = dec if isinstance(dec, Decoding) else Decoding.model_validate(dec or {})
        return self.gen.encode(req["prompt"]), max_new, dec

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.batch_wait_s)
        self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        groups: dict[tuple, list] = {}
        for item, _, fut in pending:  # one generate per (max_new_tokens, decoding)
            _, _, max_new, dec, _ = item
            groups.setdefault((max_new, dec.model_dump_json()), []).append((item, fut))
        for members in groups.values():
            for i in range(0, len(members), self.max_batch_size):
                chunk = members[i:i + self.max_batch_size]
                task = asyncio.get_running_loop().run_in_executor(None, self._run_batch, [m[0] for m in chunk])
                task.add_done_callback(lambda t, futs=[m[1] for m in chunk]: self._deliver(t, futs))

    @staticmethod
    def _deliver(task, futs) -> None:
        if task.exception() is not None:
            for f in futs:
                f.done() or f.set_exception(task.exception())
            return
        res = task.result()
        for f, r in zip(futs, res if isinstance(res, list) else [res]):
            f.done() or f.set_result(r)

    def _run_batch(self, items: list):
        """Generate for requests sharing max_new_tokens and decoding; one result per request (a dict
        when given one request)."""
        _, _, max_new, dec, _ = items[0]
        timer = _first_token_timer()
        with self._lock:
            started = time.perf_counter()
            new = self.gen.generate_ids([it[1] for it in items], max_new, dec, [dec.seed] * len(items), streamer=timer)
            ended = time.perf_counter()
        out = [self._done(it[0], n, it[4], started, timer.first_at, ended) for it, n in zip(items, new)]
        for r in out:
            r["batch_size"] = len(items)
        return out[0] if len(items) == 1 else out

    def _done(self, req: dict, new: list[int], arrived: float, started: float, first_at: float | None, ended: float) -> dict:
        r = self.gen.result(req["prompt"], new)
        n = r["n_new_tokens"]
        first_at = first_at or ended
        rate = (n - 1) / (ended - first_at) if n > 1 and ended > first_at else None
        return {"done": True, "text": r["text"], "n_new_tokens": n, "stopped": r["stopped"],
                "ttft_ms": round((first_at - arrived) * 1000, 1), "tokens_per_s": round(rate, 2) if rate else None,
                "seconds": round(ended - arrived, 3), "queued_ms": round((started - arrived) * 1000, 1)}
