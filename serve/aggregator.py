"""``PluralAggregator``, the ingress (DESIGN §4): the OpenAI-style HTTP API over FastAPI, and pluralistic decoding
driven step by step over the model deployments.

Every decoding step fans out to the K ``PerspectiveModel`` deployments (and ``BaseModel`` where the mode
needs the unsteered logits) concurrently — or makes one call to ``FusedPlural`` — combines the logits and
picks the next token (:mod:`serve.generation`). Calls carry the session id, so each replica keeps the
session's KV cache and Serve routes the session's next step back to it (:mod:`serve.routing`). A call
that fails because its replica died is retried until the request's deadline; the replica that answers
(another one, or the restarted one) replays the prefix, so the request completes.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events),
``POST /v1/distribution``, ``GET /v1/perspectives``, ``GET /v1/models``, ``GET /metrics``,
``GET /openapi.json`` and ``GET /healthz`` (the only one without a bearer key).
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
import ray
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
from serve.auth import KeyRing
from serve.config import AGGREGATOR, BASE, FUSED, ServeConfig, perspective_deployment
from serve.generation import GenParams, StepLogits, TextStream, TokenEvent, combined_scores, plural_decode
from serve.metrics import Metrics
from serve.schemas import ChatMessage, ChatRequest, CompletionRequest, DecodingParams, DistributionRequest

log = logging.getLogger("ray.serve")
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, kind: str, param: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return SafeJSONResponse(body, status_code=status, headers=headers or None)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
    extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    return _error(err.status, err.message, err.kind, err.param, **extra)


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    for e in err.errors()[:8]:
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    first = err.errors()[0].get("loc", ()) if err.errors() else ()
    param = ".".join(str(x) for x in first[1:]) or None
    return _error(422, "; ".join(problems) or "invalid request body", "invalid_request_error", param)


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


async def _wait(response: Any) -> Any:
    return await response


async def _quiet(response: Any) -> None:
    with contextlib.suppress(Exception):  # releasing is best effort: the TTL drops what is left
        await response


@dataclass
class Generated:
    ids: list[int]
    text: str
    finish_reason: str
    events: list[TokenEvent] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@serve.deployment(name=AGGREGATOR)
@serve.ingress(api)
class PluralAggregator:
    """The ingress: see the module docstring. ``replicas`` maps perspective -> its deployment's handle."""

    def __init__(
        self,
        cfg: dict[str, Any],
        perspectives: list[str],
        replicas: dict[str, Any],
        base: Any = None,
        fused: Any = None,
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
        self.perspectives = list(perspectives)
        self.replicas = {p: replicas[p] for p in self.perspectives} if replicas else {}
        self.base, self.fused = base, fused
        self.backends = [b for b, ok in (("replicas", base is not None), ("fused", fused is not None)) if ok]
        self.default_backend = "fused" if self.cfg.backend == "fused" else "replicas"
        self._client: Any = None
        self._tasks: set[asyncio.Task] = set()

    # -- validation ----------------------------------------------------------------------------------------
    def _resolve(
        self, perspectives: list[str] | None, decoding: DecodingParams | None, backend: str | None
    ) -> tuple[list[str], Decoding, str]:
        chosen = list(self.perspectives if perspectives is None else perspectives)
        if len(chosen) > self.cfg.max_perspectives:
            raise ApiError(
                422, f"perspectives: {len(chosen)} asked for, at most {self.cfg.max_perspectives}", param="perspectives"
            )
        if len(set(chosen)) != len(chosen):
            raise ApiError(422, "perspectives: each perspective may be listed once", param="perspectives")
        unknown = [p for p in chosen if p not in self.perspectives]
        if unknown:
            raise ApiError(422, f"perspectives: unknown {unknown}; served: {self.perspectives}", param="perspectives")
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

    # -- calls to the model deployments ------------------------------------------------------------------
    async def _call(self, handle: Any, method: str, name: str, deadline: float, *args: Any, **kwargs: Any) -> Any:
        """One call, retried while its replica is lost (until ``deadline``)."""
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, f"timed out waiting for {name}", kind="timeout_error")
            started = time.perf_counter()
            response = getattr(handle, method).remote(*args, **kwargs)
            try:
                result = await asyncio.wait_for(_wait(response), min(self.cfg.step_timeout_s, left))
            except RETRYABLE as err:
                outcome, why = "retry", type(err).__name__
            except TimeoutError:
                response.cancel()
                outcome, why = "timeout", "no answer"
            except ray.exceptions.RayTaskError as err:
                self.metrics.calls.labels(name, "error").inc()
                cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise ApiError(502, f"{name} failed: {cause}", kind="upstream_error") from None
            else:
                self.metrics.calls.labels(name, "ok").inc()
                self.metrics.call_seconds.labels(name).observe(time.perf_counter() - started)
                return result
            self.metrics.calls.labels(name, outcome).inc()
            attempt += 1
            log.warning("%s.%s: %s (attempt %d); retrying", name, method, why, attempt)
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    async def _logits(
        self,
        backend: str,
        ids: list[int],
        perspectives: list[str],
        needs_base: bool,
        session: str | None,
        deadline: float,
        first: bool,
    ) -> StepLogits:
        k = len(perspectives)
        if backend == "fused":
            rows: list[str | None] = [*perspectives, *([None] if needs_base else [])]
            r = await self._call(self.fused, "step_rows", FUSED, deadline, ids, rows, session=session)
            logits = torch.from_numpy(r["logits"].copy())  # Ray hands back read-only arrays
            results = [
                (FUSED, {"ran": ran, "hit": hit, "version": r["version"]})
                for ran, hit in zip(r["ran"], r["hit"], strict=True)
            ]
            steered, base = (logits[:k] if k else None), (logits[k] if needs_base else None)
        else:
            targets = [(self.replicas[p], perspective_deployment(p)) for p in perspectives]
            targets += [(self.base, BASE)] if needs_base else []
            answers = await asyncio.gather(
                *(self._call(h, "step", name, deadline, ids, session=session) for h, name in targets)
            )
            results = [(name, a) for (_, name), a in zip(targets, answers, strict=True)]
            steered = torch.from_numpy(np.stack([a["logits"] for a in answers[:k]])) if k else None
            base = torch.from_numpy(answers[k]["logits"].copy()) if needs_base else None
        replays = 0
        for name, r in results:
            self.metrics.deployment_tokens.labels(name).inc(r["ran"])
            if not first and not r["hit"]:
                replays += 1
                self.metrics.replays.labels(name).inc()
        versions = {p: results[i][1]["version"] for i, p in enumerate(perspectives)}
        return StepLogits(steered, base, {"replays": replays, "versions": versions})

    def _release(self, session: str, backend: str, perspectives: list[str], needs_base: bool) -> None:
        handles = [self.fused] if backend == "fused" else [self.replicas[p] for p in perspectives]
        if backend != "fused" and needs_base:
            handles.append(self.base)
        for h in handles:
            task = asyncio.get_running_loop().create_task(_quiet(h.release.remote(session=session)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- generation ------------------------------------------------------------------------------------------
    async def _decode(self, params: GenParams, backend: str) -> AsyncIterator[TokenEvent]:
        session = uuid.uuid4().hex
        deadline = time.monotonic() + self.cfg.request_timeout_s
        started = time.perf_counter()

        async def step_fn(ids: list[int], first: bool) -> StepLogits:
            return await self._logits(backend, ids, params.perspectives, params.needs_base, session, deadline, first)

        try:
            async with aclosing(plural_decode(step_fn, params)) as events:
                async for event in events:
                    self.metrics.tokens.labels("completion", backend).inc()
                    yield event
        finally:
            self._release(session, backend, params.perspectives, params.needs_base)
            self.metrics.generation_seconds.labels(backend).observe(time.perf_counter() - started)

    async def _generate(self, params: GenParams, backend: str, stops: list[str]) -> Generated:
        stream = TextStream(self.tokenizer, stops)
        events: list[TokenEvent] = []
        finish = "length"
        replays, versions = 0, {}
        self.metrics.tokens.labels("prompt", backend).inc(len(params.ids))
        async with aclosing(self._decode(params, backend)) as gen:
            async for event in gen:
                events.append(event)
                stream.add(event.token)
                replays += event.info.get("replays", 0)
                versions = event.info.get("versions", versions)
                if stream.stopped:
                    finish = "stop"
                    break
                finish = event.finish_reason or finish
        info = {"replays": replays, "vector_versions": versions}
        return Generated(params.ids, stream.text, finish, events, info)

    def _params(
        self, ids: list[int], perspectives: list[str], decoding: Decoding, max_tokens: int, body: Any, top_n: int
    ):
        return GenParams(
            ids=ids, perspectives=perspectives, decoding=decoding, max_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, eos=self.eos,
            ignore_eos=body.ignore_eos, top_n=top_n,
        )  # fmt: skip

    # -- response pieces ---------------------------------------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _distributions(self, events: list[TokenEvent]) -> list[dict[str, Any]]:
        def top(pairs: list[tuple[int, float]]) -> list[dict[str, Any]]:
            return [{"token": self._piece(t), "id": t, "logprob": lp} for t, lp in pairs]

        return [
            {
                "token": self._piece(e.token),
                "id": e.token,
                "logprob": e.logprob,
                "combined": top(e.top),
                "perspectives": {p: top(v) for p, v in e.per_perspective.items()},
                **({"weights": e.weights} if e.weights is not None else {}),
            }
            for e in events
        ]

    def _extension(self, perspectives: list[str], decoding: Decoding, backend: str, runs: list[Generated]):
        versions: dict[str, Any] = {}
        for r in runs:
            versions.update(r.info.get("vector_versions", {}))
        return {
            "perspectives": perspectives,
            "decoding": asdict(decoding),
            "backend": backend,
            "vectors": self.cfg.vectors,
            "vector_versions": versions,
            "replays": sum(r.info.get("replays", 0) for r in runs),
        }

    @staticmethod
    def _usage(runs: list[Generated]) -> dict[str, int]:
        prompt = sum(len(r.ids) for r in runs)
        completion = sum(len(r.events) for r in runs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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
                {"id": p, "deployment": perspective_deployment(p), "samples": meta.get("n_samples", {}).get(p)}
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
        """Prometheus text format; model replicas' memory is refreshed on each scrape."""
        targets = [(perspective_deployment(p), h) for p, h in self.replicas.items()]
        targets += [(BASE, self.base)] if self.base is not None else []
        targets += [(FUSED, self.fused)] if self.fused is not None else []

        async def one(name: str, handle: Any) -> None:
            try:
                s = await asyncio.wait_for(_wait(handle.stats.remote()), 5.0)
            except Exception:  # a replica that is down does not fail the scrape
                return
            self.metrics.replica_rss.labels(name, str(s["pid"])).set(s["rss_bytes"])
            self.metrics.replica_sessions.labels(name, str(s["pid"])).set(s["sessions"])

        await asyncio.gather(*(one(n, h) for n, h in targets))
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
        runs = await asyncio.gather(*(self._generate(p, backend, body.stops) for p in params))
        choices = []
        for i, run in enumerate(runs):
            choice: dict[str, Any] = {
                "index": i,
                "text": run.text,
                "logprobs": None,
                "finish_reason": run.finish_reason,
            }
            if body.logprobs is not None:
                choice["logprobs"] = self._completion_logprobs(run)
                choice["distributions"] = self._distributions(run.events)
            choices.append(choice)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": self._usage(runs), "pluristeer": self._extension(perspectives, decoding, backend, runs),
        }  # fmt: skip

    def _completion_logprobs(self, run: Generated) -> dict[str, Any]:
        tokens = [self._piece(e.token) for e in run.events]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in run.events],
            "top_logprobs": [{self._piece(t): lp for t, lp in e.top} for e in run.events],
            "text_offset": offsets,
        }

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
        run = await self._generate(params, backend, body.stops)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": run.text},
            "logprobs": None,
            "finish_reason": run.finish_reason,
        }
        if body.logprobs:
            choice["logprobs"] = {"content": [self._chat_logprob(e, body.top_logprobs or 0) for e in run.events]}
            choice["distributions"] = self._distributions(run.events)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": self._usage([run]), "pluristeer": self._extension(perspectives, decoding, backend, [run]),
        }  # fmt: skip

    def _chat_logprob(self, e: TokenEvent, n: int) -> dict[str, Any]:
        def item(t: int, lp: float) -> dict[str, Any]:
            piece = self._piece(t)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

        return {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:n]]}

    def _sse(self, params: GenParams, backend: str, body: Any, head: dict[str, Any], *, chat: bool):
        stops = body.stops
        usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {} if delta is None else {"content": delta}
                if first:
                    d = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        async def events() -> AsyncIterator[str]:
            stream = TextStream(self.tokenizer, stops)
            count, finish = 0, "length"
            self.metrics.tokens.labels("prompt", backend).inc(len(params.ids))
            try:
                if chat:
                    yield chunk(None, None, first=True)
                async with aclosing(self._decode(params, backend)) as gen:
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
                    n = len(params.ids)
                    totals = {"prompt_tokens": n, "completion_tokens": count, "total_tokens": n + count}
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': totals})}\n\n"
            except ApiError as err:
                error = {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}
                yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"

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
        deadline = time.monotonic() + self.cfg.request_timeout_s
        logits = await self._logits(backend, ids, perspectives, True, None, deadline, True)

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
