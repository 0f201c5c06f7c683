"""``PluralAggregator``, the ingress (DESIGN §4): the OpenAI-style HTTP API over FastAPI — thin routes.

The work is in three places, as vLLM splits its OpenAI server:

- these routes: authentication, limits and metrics middleware, request validation (perspectives, token
  limits, prompt encoding; a :class:`serve.errors.ApiError` names the field), then one call into
- :class:`serve.fanout.Fanout`, the fan-out client: pluralistic decoding driven step by step over the model
  deployments (concurrent calls, deadlines, retries of a lost replica, session release), and
- :mod:`serve.openai`, pure functions that shape the results into OpenAI's bodies and SSE events.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events),
``POST /v1/distribution``, ``GET /v1/perspectives``, ``GET /v1/models``, ``GET /metrics``,
``GET /openapi.json`` and ``GET /healthz`` (the only one without a bearer key).
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.registry import RegistryClient
from sae.decoding import Decoding
from sae.lm import load_tokenizer, resolve_model
from sae.readout import ReadoutError, label_token_ids, option_probs
from serve import openai
from serve.auth import KeyRing
from serve.config import AGGREGATOR, POOL, ServeConfig, perspective_deployment
from serve.errors import ApiError
from serve.fanout import Fanout
from serve.generation import GenParams, TextStream, combined_scores
from serve.metrics import Metrics
from serve.schemas import ChatMessage, ChatRequest, CompletionRequest, DecodingParams, DistributionRequest

log = logging.getLogger("ray.serve")
ENDPOINTS = (
    "/v1/completions", "/v1/chat/completions", "/v1/distribution", "/v1/perspectives", "/v1/models", "/metrics",
    "/healthz", "/openapi.json",
)  # fmt: skip


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a request's lone surrogates echoed back cannot break the encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


api = FastAPI(
    title="pluristeer",
    default_response_class=SafeJSONResponse,
    version="0.1.0",
    description="Steered perspectives and pluralistic decoding, OpenAI-style.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,  # served below, behind the key
)


def _error(status: int, message: str, kind: str, param: str | None = None, **headers: str) -> JSONResponse:
    body = openai.error_body(status, message, kind, param)
    return SafeJSONResponse(body, status_code=status, headers=headers or None)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
    extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    return _error(err.status, err.message, err.kind, err.param, **extra)


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
    message, param = openai.validation_error(err.errors())
    return _error(422, message, "invalid_request_error", param)


@api.exception_handler(StarletteHTTPException)
async def _http(_request: Request, err: StarletteHTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail), "invalid_request_error")


@api.exception_handler(Exception)
async def _internal(_request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error in %s", AGGREGATOR)
    return _error(500, f"internal error ({type(err).__name__})", "server_error")


@api.middleware("http")
async def _limits_and_metrics(request: Request, call_next: Any) -> Response:
    state = request.app.state
    length = request.headers.get("content-length")
    limit = getattr(state, "max_body_bytes", 1_000_000)
    if length is not None and (not length.isdigit() or int(length) > limit):
        return _error(413, f"request body larger than {limit} bytes", "invalid_request_error")
    path = request.scope.get("path", "")[len(request.scope.get("root_path", "")) :] or "/"
    endpoint = path if path in ENDPOINTS else "other"
    started = time.perf_counter()
    response = await call_next(request)
    metrics: Metrics | None = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
    return response


bearer = HTTPBearer(auto_error=False, description="an API key from PLURISTEER_API_KEYS")


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """The bearer-key check of every endpoint but ``/healthz`` (keys: :class:`serve.auth.KeyRing`)."""
    if not getattr(request.app.state, "auth", True):
        return
    ring: KeyRing | None = getattr(request.app.state, "keys", None)
    header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
    if ring is None or not ring.allows(header):
        raise ApiError(
            401, "missing or unknown API key: send 'Authorization: Bearer <key>'", kind="authentication_error"
        )


Auth = [Depends(require_key)]


@serve.deployment(name=AGGREGATOR)
@serve.ingress(api)
class PluralAggregator:
    """The ingress: see the module docstring. ``replicas`` maps perspective -> its deployment's handle;
    ``pool`` is the ``PerspectivePool`` handle serving ``pooled`` (served besides ``perspectives``)."""

    def __init__(
        self,
        cfg: dict[str, Any],
        perspectives: list[str],
        replicas: dict[str, Any],
        base: Any = None,
        fused: Any = None,
        pool: Any = None,
        pooled: list[str] | None = None,
    ) -> None:
        from transformers import AutoConfig

        self.cfg = ServeConfig.from_dict(cfg)
        api.state.auth = self.cfg.auth
        api.state.keys = KeyRing.from_env(self.cfg.api_keys_env, required=self.cfg.auth)
        api.state.max_body_bytes = self.cfg.max_body_bytes
        api.state.metrics = self.metrics = Metrics()
        self.tokenizer = load_tokenizer(self.cfg.model)
        source = resolve_model(self.cfg.model)
        self.model_name = source.name
        self.max_positions = int(getattr(AutoConfig.from_pretrained(source.path), "max_position_embeddings", 1 << 20))
        self.eos = self.tokenizer.eos_token_id
        self.pooled = list(pooled or [])
        self.perspectives = [*perspectives, *self.pooled]
        self.fanout = Fanout(
            {p: replicas[p] for p in perspectives} if replicas else {}, base, fused,
            pool=pool, pooled=self.pooled,
            step_timeout_s=self.cfg.step_timeout_s, request_timeout_s=self.cfg.request_timeout_s,
            metrics=self.metrics, decode_on_replica=self.cfg.decode_on_replica,
        )  # fmt: skip
        self._served = frozenset(self.perspectives)
        self.backends = self.fanout.backends
        self.default_backend = "fused" if self.cfg.backend == "fused" else "replicas"
        self._client: Any = None

    # -- validation ----------------------------------------------------------------------------------------
    def _resolve(
        self, perspectives: list[str] | None, decoding: DecodingParams | None, backend: str | None
    ) -> tuple[list[str], Decoding, str]:
        chosen = list(self.perspectives if perspectives is None else perspectives)
        if len(chosen) > self.cfg.max_perspectives:
            default = "" if perspectives is not None else " (the default is every served perspective: name some)"
            raise ApiError(
                422, f"perspectives: {len(chosen)} asked for{default}, at most {self.cfg.max_perspectives}",
                param="perspectives",
            )  # fmt: skip
        if len(set(chosen)) != len(chosen):
            raise ApiError(422, "perspectives: each perspective may be listed once", param="perspectives")
        unknown = [p for p in chosen if p not in self._served]
        if unknown:
            served = self.perspectives if len(self.perspectives) <= 20 else [*self.perspectives[:20], "..."]
            raise ApiError(
                422, f"perspectives: unknown {unknown}; served ({len(self.perspectives)}): {served} "
                "(GET /v1/perspectives lists them all)", param="perspectives",
            )  # fmt: skip
        d = decoding or DecodingParams()
        dec = Decoding(
            mode=d.mode or self.cfg.decoding_mode,  # type: ignore[arg-type]
            alpha=self.cfg.alpha if d.alpha is None else d.alpha,
            tau=self.cfg.tau if d.tau is None else d.tau,
            top_k=self.cfg.top_k if d.top_k is None else d.top_k,
            reference=d.reference,
        )
        chosen_backend = backend or self.default_backend
        if chosen_backend not in self.backends:
            raise ApiError(
                422, f"backend: {chosen_backend!r} is not deployed here; use {self.backends}", param="backend"
            )
        return chosen, dec, chosen_backend

    def _max_tokens(self, asked: int | None, default: int) -> int:
        n = default if asked is None else asked
        if n > self.cfg.max_tokens_limit:
            raise ApiError(422, f"max_tokens: {n} is above the limit {self.cfg.max_tokens_limit}", param="max_tokens")
        return n

    def _check_prompt(self, ids: list[int], max_tokens: int, param: str) -> list[int]:
        if not ids:
            raise ApiError(422, f"{param}: encodes to no tokens", param=param)
        if len(ids) > self.cfg.max_prompt_tokens:
            raise ApiError(422, f"{param}: {len(ids)} tokens, the limit is {self.cfg.max_prompt_tokens}", param=param)
        if len(ids) + max_tokens > self.max_positions:
            raise ApiError(
                422, f"{param}: {len(ids)} + max_tokens {max_tokens} tokens exceed the model's {self.max_positions}",
                param=param,
            )  # fmt: skip
        return ids

    def _tokens(self, text: str, param: str, special: bool) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=special)["input_ids"]
        except Exception as err:  # e.g. lone surrogates, which JSON can carry but UTF-8 cannot
            raise ApiError(422, f"{param}: cannot be tokenized ({type(err).__name__})", param=param) from None

    def _encode_prompt(self, text: str) -> list[int]:
        return self._tokens(text, "prompt", self.cfg.add_special_tokens)

    def _encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
        prefill = turns[-1]["role"] == "assistant"  # continue the assistant's message
        try:
            if getattr(self.tokenizer, "chat_template", None) is None:
                text = "".join(f"{t['role']}: {t['content']}\n\n" for t in turns) + ("" if prefill else "assistant:")
                return self._tokens(text, "messages", True)
            text = self.tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
            )
        except Exception as err:  # templates raise on turn orders they do not support
            raise ApiError(422, f"messages: the chat template refused them ({err})", param="messages") from None
        return self._tokens(text, "messages", False)

    def _params(
        self, ids: list[int], perspectives: list[str], decoding: Decoding, max_tokens: int, body: Any, top_n: int
    ):
        return GenParams(
            ids=ids, perspectives=perspectives, decoding=decoding, max_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, eos=self.eos,
            ignore_eos=body.ignore_eos, top_n=top_n,
        )  # fmt: skip

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _extension(self, perspectives: list[str], decoding: Decoding, backend: str, runs: list[Any]):
        return openai.extension(perspectives, decoding, backend, self.cfg.vectors, runs)

    # -- endpoints -----------------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "perspectives": len(self.perspectives), "backends": self.backends}

    @api.get("/openapi.json", dependencies=Auth, include_in_schema=False)
    async def openapi(self) -> dict[str, Any]:
        return api.openapi()

    @api.get("/v1/models", dependencies=Auth)
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "pluristeer"}]}

    @api.get("/v1/perspectives", dependencies=Auth)
    async def list_perspectives(self) -> dict[str, Any]:
        """The served perspectives, the vector set's current version and metadata."""
        entry = await asyncio.to_thread(self._entry)
        meta = entry.get("meta", {})
        return {
            "object": "list",
            "data": [
                {"id": p, "deployment": POOL if p in self.fanout.pooled else perspective_deployment(p),
                 "samples": meta.get("n_samples", {}).get(p)}
                for p in self.perspectives
            ],
            "vectors": {
                "key": entry.get("key"),
                **{k: meta.get(k) for k in ("model", "layer", "mode", "granularity", "task", "readout", "created")},
            },
            "backends": self.backends,
            "decoding": {"mode": self.cfg.decoding_mode, "alpha": self.cfg.alpha, "tau": self.cfg.tau,
                         "top_k": self.cfg.top_k},
        }  # fmt: skip

    def _entry(self) -> dict[str, Any]:

        if self._client is None:
            self._client = RegistryClient(self.cfg.registry_dir, address=self.cfg.ray_address)
        entry = self._client.entry(self.cfg.vectors)
        return {k: v for k, v in entry.items() if k != "ref"}

    @api.get("/metrics", dependencies=Auth)
    async def metrics_text(self) -> Response:
        """Prometheus text format; model replicas' memory is refreshed on each scrape, except for deployments
        that autoscale from ``min_replicas: 0``: a call to one at zero, or to one scaling down as the call
        arrives, is queued by its handle and wakes it, so none is called."""
        for name, st in await self.fanout.stats(skip=self.cfg.scales_to_zero):
            self.metrics.replica_rss.labels(name, str(st["pid"])).set(st["rss_bytes"])
            self.metrics.replica_sessions.labels(name, str(st["pid"])).set(st["sessions"])
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    @api.post("/v1/completions", dependencies=Auth)
    async def completions(self, body: CompletionRequest) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if len(prompts) > self.cfg.max_prompts:
            raise ApiError(422, f"prompt: {len(prompts)} prompts, at most {self.cfg.max_prompts}", param="prompt")
        if body.stream and len(prompts) > 1:
            raise ApiError(422, "prompt: streaming takes a single prompt", param="prompt")
        perspectives, decoding, backend = self._resolve(body.perspectives, body.decoding, body.backend)
        max_tokens = self._max_tokens(body.max_tokens, self.cfg.default_max_tokens)
        params = [
            self._params(self._check_prompt(self._encode_prompt(p), max_tokens, "prompt"), perspectives, decoding,
                         max_tokens, body, body.logprobs or 0)
            for p in prompts
        ]  # fmt: skip
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or self.model_name
        if body.stream:
            head = {"id": rid, "object": "text_completion", "created": created, "model": model}
            return self._sse(params[0], backend, body, head, chat=False)
        runs = await asyncio.gather(*(self.fanout.generate(p, backend, self.tokenizer, body.stops) for p in params))
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        ext = self._extension(perspectives, decoding, backend, runs)
        return openai.completion_body(head, runs, body.logprobs, self._piece, ext)

    @api.post("/v1/chat/completions", dependencies=Auth)
    async def chat_completions(self, body: ChatRequest) -> Any:
        perspectives, decoding, backend = self._resolve(body.perspectives, body.decoding, body.backend)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self._max_tokens(asked, self.cfg.max_tokens_limit)
        top_n = (body.top_logprobs or 1) if body.logprobs else 0
        ids = self._check_prompt(self._encode_chat(body.messages), max_tokens, "messages")
        params = self._params(ids, perspectives, decoding, max_tokens, body, top_n)
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or self.model_name
        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            return self._sse(params, backend, body, head, chat=True)
        run = await self.fanout.generate(params, backend, self.tokenizer, body.stops)
        head = {"id": rid, "object": "chat.completion", "created": created, "model": model}
        ext = self._extension(perspectives, decoding, backend, [run])
        return openai.chat_body(head, run, bool(body.logprobs), body.top_logprobs or 0, self._piece, ext)

    def _sse(self, params: GenParams, backend: str, body: Any, head: dict[str, Any], *, chat: bool):
        stops = body.stops
        usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            return openai.stream_chunk(head, delta, finish, chat=chat, first=first)

        async def events() -> AsyncIterator[str]:
            stream = TextStream(self.tokenizer, stops)
            count, finish = 0, "length"
            self.metrics.tokens.labels("prompt", backend).inc(len(params.ids))
            try:
                if chat:
                    yield chunk(None, None, first=True)
                async with aclosing(self.fanout.decode(params, backend)) as gen:
                    async for event in gen:
                        count += 1
                        delta = stream.add(event.token)
                        if stream.stopped:
                            finish = "stop"
                            if delta:
                                yield chunk(delta, None)
                            break
                        finish = event.finish_reason or finish
                        if delta:
                            yield chunk(delta, None)
                tail = stream.flush()
                if tail:
                    yield chunk(tail, None)
                yield chunk(None if chat else "", finish)
                if usage:
                    yield openai.stream_usage(head, len(params.ids), count)
            except ApiError as err:
                yield openai.stream_error(err)
            yield openai.STREAM_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.post("/v1/distribution", dependencies=Auth)
    async def distribution(self, body: DistributionRequest) -> dict[str, Any]:
        """Probabilities of ``options`` as the next token: per perspective, unsteered and combined."""

        if (body.prompt is None) == (body.messages is None):
            raise ApiError(422, "give exactly one of prompt and messages", param="prompt")
        perspectives, decoding, backend = self._resolve(body.perspectives, body.decoding, body.backend)
        if body.prompt is not None:
            ids = self._check_prompt(self._encode_prompt(body.prompt), 1, "prompt")
        else:
            ids = self._check_prompt(self._encode_chat(body.messages or []), 1, "messages")
        try:
            label_ids = label_token_ids(self.tokenizer, body.options)
        except ReadoutError as err:
            raise ApiError(422, f"options: {err}", param="options") from None
        except Exception as err:  # the tokenizer refuses the text
            raise ApiError(422, f"options: cannot be tokenized ({type(err).__name__})", param="options") from None
        logits = await self.fanout.logits(backend, ids, perspectives, True, None, self.fanout.deadline(), True)

        def probs(scores: torch.Tensor) -> dict[str, Any]:
            p, coverage = option_probs(scores[None], label_ids)
            return {"probs": p[0].tolist(), "coverage": float(coverage[0])}

        assert logits.base is not None
        each = {p: probs(logits.steered[i]) for i, p in enumerate(perspectives)} if logits.steered is not None else {}
        return {
            "object": "distribution",
            "model": body.model or self.model_name,
            "options": body.options,
            "prompt_tokens": len(ids),
            "perspectives": each,
            "unsteered": probs(logits.base),
            "combined": probs(combined_scores(logits, perspectives, decoding)),
            "decoding": asdict(decoding),
            "backend": backend,
            "vector_versions": logits.info.get("versions", {}),
        }


__all__ = ["PluralAggregator", "api", "require_key"]
