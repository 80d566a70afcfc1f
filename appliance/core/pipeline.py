"""One request's journey: validate -> plan the route -> cache -> admit -> try targets -> relay -> account.

Web-server free: the route hands in an Exchange and a Responder and renders any GatewayError. The
plan lists every target a request may reach (the alias's, then the request's own ``fallbacks``); the
selector orders them by the alias's strategy; each is tried with retries while its breaker allows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from appliance.accounts.auth import ANONYMOUS_ID
from appliance.accounts.usage import NO_COST
from appliance.common import system_messages
from appliance.common.errors import GatewayError, retry_after_headers
from appliance.core import cache, failover, guarding, resilience, router, templates, vision
from appliance.core.catalog import Plan, Route
from appliance.core.embeddings import CACHE
from appliance.core.exchange import (
    Exchange,
    Responder,
    admit,
    allowed_routes,
    begin,
    charge_from,
    compute_cost,
    may_use,
    ms,
    record,
    record_failure,
    record_side_call,
    upstream_key,
    upstreams,
    usage_extras,
)
from appliance.core.gateway import Gateway
from appliance.core.relay import AS_IS, OPENAI, RAW, Surface
from appliance.core.routing import Target
from appliance.core.uploads import Upload, noted
from appliance.providers.base import (
    CAPABILITY_OF,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    IMAGES,
    MODERATIONS,
    RERANK,
    SCORE,
    SPEECH,
    UPLOADS,
    Call,
)

log = logging.getLogger("appliance.core.pipeline")

# Body fields that steer the gateway and must not reach a backend.
GATEWAY_FIELDS = ("fallbacks", "fallback", "provider", "timeout", "retries", "template", "guardrails")
MAX_RETRIES = 5
TRUE = ("1", "true", "yes")
SIMILARITY_HEADER = "X-Appliance-Cache-Similarity"

# What a JSON body must hold besides its model (the rest is the backend's to judge), and which may stream.
_REQUIRED = {CHAT: (), COMPLETIONS: ("prompt",), EMBEDDINGS: ("input",), RERANK: ("query", "documents"),
             SCORE: (), MODERATIONS: ("input",), IMAGES: ("prompt",), SPEECH: ("input",)}
_STREAMS = frozenset((CHAT, COMPLETIONS, IMAGES, SPEECH))
# The endpoints whose answers are OpenAI's chat, completion or embedding JSON (usage added, cacheable).
_OPENAI_ANSWERS = frozenset((CHAT, COMPLETIONS, EMBEDDINGS))


def surface_of(endpoint: str) -> Surface:
    """How an endpoint's answer reaches the client."""
    if endpoint in _OPENAI_ANSWERS:
        return OPENAI
    if endpoint == SPEECH or endpoint in UPLOADS:
        return RAW  # audio, or whatever a transcription was asked to be (JSON, text, subtitles, events)
    return AS_IS


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise GatewayError("invalid_json", "The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError("invalid_json", f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError("invalid_json", "The request body must be a JSON object.")
    return body


def validate(endpoint: str, body: dict[str, Any]) -> None:
    """The few checks the gateway needs; everything else is the backend's to judge."""
    validate_model(body)
    for required in _REQUIRED.get(endpoint, ()):
        if body.get(required) is None:
            raise GatewayError("missing_field", f"Missing required parameter: '{required}'.", param=required)
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            _no_messages(body, messages)
        else:
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                    raise GatewayError("invalid_value", f"messages[{i}] must be an object with a 'role'.",
                                       param=f"messages.[{i}].role")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError("invalid_value", "'stream' must be a boolean.", param="stream")
    if stream and endpoint not in _STREAMS:
        raise GatewayError("invalid_value", f"/v1/{endpoint} answers cannot be streamed.", param="stream")


def _no_messages(body: dict[str, Any], messages: Any) -> None:
    """A chat body without messages: fine with a template (its messages come first), else a 400."""
    if (messages is None or messages == []) and "template" in body:
        return
    if messages is None:
        raise GatewayError("missing_field", "Missing required parameter: 'messages'.", param="messages")
    raise GatewayError("invalid_value", "'messages' must be a non-empty array.", param="messages")


def validate_model(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise GatewayError("missing_field", "You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise GatewayError("invalid_value", "'model' must be a non-empty string.", param="model")


def upstream_body(body: dict[str, Any], route: Route) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    out["model"] = route.upstream_model
    return out


def _for_target(gw: Gateway, x: Exchange, endpoint: str, body: dict[str, Any], route: Route) -> dict[str, Any]:
    """The body one target gets: a chat body's system messages where its backend and model want them."""
    out = upstream_body(body, route)
    if endpoint == CHAT:
        system_role = gw.catalog.said(route, "system_role")  # one dict lookup when no model sets it
        if system_role is not None:
            kind = upstreams(gw, x).providers[route.backend].kind
            if system_messages.placement(kind, system_role) == "merged" and isinstance(out.get("messages"), list):
                out["messages"] = system_messages.merged(out["messages"])
    return out


# ------------------------------------------------------------------------------------------ the plan


def plan_for(gw: Gateway, x: Exchange, body: dict[str, Any]) -> Plan:
    """Where this request may go: its model's plan, as the request's own overrides reshape it."""
    forced_route = x.controls.get("x-appliance-route")
    plan = gw.catalog.plan(forced_route or body["model"], may_use(x))
    backend = body.get("provider", x.controls.get("x-appliance-backend"))
    if backend is not None:
        plan = _on_backend(gw, plan, backend, body["model"])
    extra = body.get("fallbacks", body.get("fallback"))
    if extra is not None:
        plan = _with_fallbacks(gw, plan, extra, "fallbacks" if "fallbacks" in body else "fallback")
    return plan


def _on_backend(gw: Gateway, plan: Plan, backend: Any, model: str) -> Plan:
    if not isinstance(backend, str) or backend not in gw.providers:
        known = ", ".join(gw.providers) or "none"
        raise GatewayError("invalid_value", f"Unknown backend {backend!r} (known: {known}).", param="provider")
    routes = tuple(r for r in plan.routes if r.backend == backend)
    return Plan(plan.model, routes or (Route(model, backend, plan.routes[0].upstream_model),), plan.alias)


def _with_fallbacks(gw: Gateway, plan: Plan, fallbacks: Any, param: str) -> Plan:
    """Append the request's fallback models (names, or objects with a "model") to the plan."""
    if not isinstance(fallbacks, list):
        raise GatewayError("invalid_value", f"'{param}' must be an array of model names.", param=param)
    routes = list(plan.routes)
    for i, item in enumerate(fallbacks):
        name = item.get("model") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name:
            raise GatewayError("invalid_value", f"{param}[{i}] must be a model name.", param=f"{param}[{i}]")
        try:
            found = gw.catalog.plan(name).routes
        except GatewayError:
            continue  # an unknown or unserved fallback is skipped, not an error: the primary may answer
        routes += [r for r in found if r not in routes]
    return Plan(plan.model, tuple(routes), plan.alias)


def _retries(gw: Gateway, x: Exchange, body: dict[str, Any], plan: Plan) -> int:
    if x.controls.get("x-appliance-no-retry", "").lower() in TRUE:
        return 0
    asked = body.get("retries")
    if asked is not None:
        if not isinstance(asked, int) or isinstance(asked, bool) or not 0 <= asked <= MAX_RETRIES:
            raise GatewayError("invalid_value", f"'retries' must be an integer from 0 to {MAX_RETRIES}.",
                               param="retries")
        return asked
    if plan.alias is not None and plan.alias.retries is not None:
        return plan.alias.retries
    return gw.settings.routing.retries


def _timeout_s(gw: Gateway, body: dict[str, Any], plan: Plan) -> float | None:
    """The attempt timeout the request and its alias ask for (None: the backend's own)."""
    limit = plan.alias.timeout_s if plan.alias is not None else None
    asked = body.get("timeout")
    if asked is not None:
        if not isinstance(asked, int | float) or isinstance(asked, bool) or asked <= 0:
            raise GatewayError("invalid_value", "'timeout' must be a positive number of milliseconds.",
                               param="timeout")
        asked_s = min(asked / 1000, gw.settings.routing.max_timeout_s)
        limit = asked_s if limit is None else min(limit, asked_s)
    return limit


# ------------------------------------------------------------------------------------------ the router


async def route(gw: Gateway, raw: bytes, x: Exchange, responder: Responder) -> None:
    """POST /v1/router: the router's decision alone (``"execute": false``), or the chat served on its choice."""
    try:
        body = parse_body(raw)
        if not gw.router.enabled:
            raise GatewayError("not_found", "No router profiles are configured ([[router.profiles]]).")
        x.body = body = {**body, "model": gw.router.settings.name}  # any model sent: the router chooses
        validate(CHAT, body)
        if "template" in body:  # the router judges the prompt as the model will see it
            body = await _templated(gw, CHAT, x, body)
        options = router.options(body, gw.router.settings)
    except GatewayError as exc:
        record(gw, x, exc.status, error_code=exc.code)
        raise
    if options.execute:
        await serve(gw, CHAT, body, x, responder)
        return
    begin(gw, x)
    try:
        await gw.wait_discovered()
        decision, chosen = await _decide(gw, x, body, options)
        await admit(gw, x, body, chosen.route, counts_tokens=False)  # an embedding call, no generation: rpm only
        x.notes = {router.HEADER: decision.profile}
        record(gw, x, 200)
        await responder.complete(200, x.response_headers(), orjson.dumps(decision.as_dict()))
    except (Exception, asyncio.CancelledError) as exc:
        record_failure(gw, x, exc)
        raise


async def _routed(gw: Gateway, x: Exchange, body: dict[str, Any]) -> dict[str, Any]:
    """The body for the router's choice: its model, without the router's own fields."""
    decision, _ = await _decide(gw, x, body, router.options(body, gw.router.settings))
    x.notes = {**(x.notes or {}), router.HEADER: decision.profile}
    return {**{k: v for k, v in body.items() if k not in router.FIELDS}, "model": decision.model}


async def _decide(gw: Gateway, x: Exchange, body: dict[str, Any],
                  options: router.Options) -> tuple[router.Decision, router.Candidate]:
    routing = gw.router  # one config generation for the whole decision, whatever a reload does meanwhile
    chosen_from = router.candidates(routing.settings.profiles, gw.catalog, gw.prices, may_use(x), options.models)
    decision = await routing.decide(body, chosen_from, options.cost_weight, x.upstream_id)
    return decision, next(c for c in chosen_from if c.profile.name == decision.profile)


# ------------------------------------------------------------------------------------------ serving


async def proxy(gw: Gateway, endpoint: str, raw: bytes, x: Exchange, responder: Responder) -> None:
    """Serve a JSON body: chat/completions, completions, embeddings, rerank, score, moderations, images, speech."""
    try:
        x.body = body = parse_body(raw)
        validate(endpoint, body)
    except GatewayError as exc:
        record(gw, x, exc.status, error_code=exc.code)
        raise
    await serve(gw, endpoint, body, x, responder, surface_of(endpoint))


async def proxy_upload(gw: Gateway, endpoint: str, upload: Upload, x: Exchange, responder: Responder) -> None:
    """Serve a multipart upload (image edits, transcriptions, translations): read up to its model, then stream it.

    It is tried again, or on another target, only while no byte past what was read to find the model has gone
    to a backend (see core/uploads.py); after that a failure is final.
    """
    try:
        x.body = body = noted(await upload.scan())
        validate_model(body)
    except GatewayError as exc:
        record(gw, x, exc.status, error_code=exc.code)
        raise
    x.upload = upload
    await serve(gw, endpoint, body, x, responder, surface_of(endpoint))


async def serve(gw: Gateway, endpoint: str, body: dict[str, Any], x: Exchange, responder: Responder,
                surface: Surface = OPENAI) -> None:
    """Serve a valid OpenAI-shaped body; ``surface`` renders the answer (translated for Messages, Responses)."""
    x.body = x.body or body
    begin(gw, x)
    try:
        if "template" in body:  # the one cost to a request without a template
            body = await _templated(gw, endpoint, x, body)
        await gw.wait_discovered()
        if endpoint == CHAT and gw.router.serves(body.get("model")):
            body = await _routed(gw, x, body)
        x.upstreams = gw.upstreams  # the plan's generation: no await between the two
        plan = plan_for(gw, x, body)
        plan = Plan(plan.model, allowed_routes(gw, x, plan.routes), plan.alias)
        x.route = plan.routes[0]
        x.route_name = plan.name if plan.alias is not None else None  # a model named directly is no route
        body = guarding.begin(gw, x, endpoint, body, plan)
        if x.guard is not None:
            body = await guarding.check_input(gw, x, endpoint, body)
        decision = cache.decide(endpoint, body, x.controls, gw.settings.cache)
        store = None
        # A guarded request is never answered from, nor stored in, the cache: its answer is checked (and maybe
        # redacted) each time, and what the cache holds is the backend's answer as it came.
        if decision.cacheable and surface.cacheable and x.guard is None:
            x.cache = "BYPASS" if decision.bypass else "MISS"
            if not decision.bypass:
                store, hit = await _look_up(gw, endpoint, body, plan, x, decision.ttl_s)
                if hit is not None:
                    await _serve_hit(gw, x, body, hit, responder)
                    return
        await admit(gw, x, body, x.route)
        await _dispatch(gw, endpoint, body, plan, x, responder, surface, store)
    except (Exception, asyncio.CancelledError) as exc:
        record_failure(gw, x, exc)
        raise


async def _templated(gw: Gateway, endpoint: str, x: Exchange, body: dict[str, Any]) -> dict[str, Any]:
    """The body with its template's rendered messages ahead of its own (templates.combine), ``template`` gone."""
    if endpoint != CHAT:
        raise GatewayError("invalid_value", f"'template' is for chat requests; /v1/{endpoint} takes none.",
                           param="template")
    x.template, rendered = await templates.rendered_for(gw.templates, body["template"])
    out = {k: v for k, v in body.items() if k != "template"}
    out["messages"] = templates.combine(rendered, body.get("messages") or [])
    return out


async def _look_up(gw: Gateway, endpoint: str, body: dict[str, Any], plan: Plan, x: Exchange,
                   ttl_s: float) -> tuple[cache.Store, cache.Hit | None]:
    """The stored answer to this request (exact, else similar where the route asks for it), and where its
    answer is to be stored otherwise. The embedding call happens only after the exact key missed."""
    # One target: the backend model that answers; several: any of the route's targets may answer.
    route = plan.routes[0]
    served = f"{route.backend}/{route.upstream_model}" if len(plan.routes) == 1 else f"route:{plan.name}"
    entry = gw.catalog.configured(plan)
    policy = cache.policy(gw.settings.cache, entry.cache if entry is not None else None)
    # A key with its own upstream credentials never shares entries, even where the route shares: what it got was
    # served on its own account (and may differ), and what others got was not paid for by it.
    principal = x.principal
    shared = principal is None or (policy.shared and not principal.upstream_keys)
    scope = None if shared else principal.key_id  # type: ignore[union-attr]
    store = cache.Store(cache.cache_key(endpoint, body, served, scope), ttl_s)
    hit = await gw.cache.get(store.key)
    if hit is not None:
        x.cache = "HIT"
        return store, hit
    embedder = gw.embedder
    text = cache.semantic_prompt(body, embedder.settings.max_input_chars) if (
        endpoint == CHAT and policy.semantic) else None
    if text is None or embedder.model is None:
        return store, None
    try:
        (vector,) = await embedder.embed([text], purpose=CACHE, request_id=x.upstream_id)
    except GatewayError as exc:  # the cache never fails a request: answered as a miss
        log.warning("semantic cache lookup skipped: %s", exc.message)
        return store, None
    context = cache.context_key(body, served, scope, embedder.model)
    store = store._replace(context=context, vector=vector)
    found = await gw.cache.similar(context, vector, policy.threshold)
    if found is None:
        return store, None
    x.cache = "HIT-SEMANTIC"
    x.notes = {**(x.notes or {}), SIMILARITY_HEADER: f"{found.similarity:.3f}"}
    return store, found.hit


async def _serve_hit(gw: Gateway, x: Exchange, body: dict[str, Any], hit: cache.Hit, responder: Responder) -> None:
    """A stored answer: counts toward the key's rpm, not its tokens or budget, and costs nothing."""
    await admit(gw, x, body, x.route, counts_tokens=False)  # type: ignore[arg-type]
    headers = {**x.response_headers(), "X-Appliance-Cache-Age": str(int(hit.age_s)),
               "X-Appliance-Cost-Usd": f"{0:.9f}"}
    latency = time.perf_counter() - x.started
    if body.get("stream"):
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        usage = {**hit.tokens.as_usage(), **usage_extras(NO_COST, x, latency)}
        await responder.start_stream(headers)
        record(gw, x, 200, tokens=hit.tokens, cost=NO_COST, ttft_s=latency)  # in the ledger before the answer
        await responder.end_stream(cache.synthesized_stream(hit.body, include_usage=include_usage, usage=usage))
    else:
        data = orjson.loads(hit.body)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else hit.tokens.as_usage()
        data["usage"] = {**usage, **usage_extras(NO_COST, x, latency)}
        headers["X-Appliance-Latency-Ms"] = ms(latency)
        answer = orjson.dumps(data)
        if gw.settings.log.store_bodies:
            x.response_body = answer
        record(gw, x, 200, tokens=hit.tokens, cost=NO_COST, ttft_s=latency)
        await responder.complete(200, headers, answer)


async def _dispatch(gw: Gateway, endpoint: str, body: dict[str, Any], plan: Plan, x: Exchange,
                    responder: Responder, surface: Surface, store: cache.Store | None) -> None:
    """Try the plan's targets in the strategy's order, with retries, until one answers."""
    retries = _retries(gw, x, body, plan)
    timeout_s = _timeout_s(gw, body, plan)
    stream = bool(body.get("stream"))
    first_token_s = plan.alias.first_token_timeout_s if plan.alias is not None else None
    by_target = {Target(r.backend, r.upstream_model): r for r in plan.routes}
    order = gw.order(plan, list(by_target))
    if len(order) > 1 and not gw.admission.has_room(order[0].backend):
        # The pick would wait in the queue: a target with room goes first (the strategy's order otherwise kept).
        order = sorted(order, key=lambda t: not gw.admission.has_room(t.backend))
    last_error: GatewayError | None = None
    first_failed: Route | None = None
    skipped: list[str] = []
    images = Images(body) if endpoint == CHAT and vision.has_images(body.get("messages")) else None
    goes_on = stream and endpoint == CHAT and len(order) > 1 and gw.settings.routing.stream_failover and (
        body.get("n") in (None, 1))
    for position, target in enumerate(order):
        route = by_target[target]
        unsupported = _unsupported(gw, x, endpoint, route)
        if unsupported is not None:
            last_error = last_error or unsupported
            continue
        if not gw.breakers.allow(route.backend):
            skipped.append(route.backend)
            first_failed = first_failed or route  # skipped for failing: the client still learns of it
            continue
        sent = body
        if images is not None and gw.catalog.vision(route) is False:
            if gw.describer.model is None:
                last_error = last_error or vision.no_describer(route)
                continue  # another target may take the images as they are
            sent = await images.described(gw, x)
        for attempt in range(retries + 1):
            x.route = route
            x.attempts += 1
            x.fallback_from = first_failed if first_failed is not None and first_failed != route else None
            if goes_on:
                x.failover = _failover(gw, x, body, sent, plan, [(by_target[t], t) for t in order[position + 1:]],
                                       images, first_token_s)
            error = await _attempt(gw, endpoint, sent, route, target, x, responder, surface, timeout_s,
                                   first_token_s, stream, store)
            if error is None:
                return
            last_error = error
            first_failed = first_failed or route
            if attempt == retries or not gw.breakers.allow(route.backend):
                break
            x.retries += 1
            await asyncio.sleep(resilience.backoff(
                attempt, base_s=gw.settings.routing.retry_base_s, max_s=gw.settings.routing.retry_max_s,
                retry_after_s=resilience.retry_after_of(error.headers), rng=gw.rng))
    if last_error is None:
        wait = gw.breakers.retry_after(skipped)
        raise GatewayError("no_healthy_backend", f"Every backend for {plan.name!r} is failing "
                           f"({', '.join(skipped)}); try again in {wait:.0f} s.", headers=retry_after_headers(wait))
    raise last_error


def _failover(gw: Gateway, x: Exchange, body: dict[str, Any], sent: dict[str, Any], plan: Plan,
              rest: list[tuple[Route, Target]], images: Images | None,
              first_token_s: float | None) -> failover.Failover | None:
    """How a chat stream may go on after its backend fails mid-way: on the plan's later targets."""
    if not rest:
        return None
    stall_ms = plan.alias.stream_stall_ms if plan.alias is not None else None

    def body_for(route: Route) -> dict[str, Any] | None:
        if _unsupported(gw, x, CHAT, route) is not None:
            return None
        if images is not None and sent is body and gw.catalog.vision(route) is False:
            return None  # its images would first need describing: not in the middle of a stream
        return _for_target(gw, x, CHAT, sent, route)

    return failover.Failover(gw, x, rest, body_for, (stall_ms or gw.settings.routing.stream_stall_ms) / 1000,
                             first_token_s)


class Images:
    """A request's images, described for targets without vision: once per request, whichever targets ask."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self._described: dict[str, Any] | None = None

    async def described(self, gw: Gateway, x: Exchange) -> dict[str, Any]:
        """The body with each image part replaced by its description; the describer's calls go in the ledger."""
        if self._described is None:
            messages = self._body["messages"]
            urls = {url: vision.image_key(url, i) for i, url in vision.image_urls(messages)}
            texts, spent = await gw.describer.describe(urls, x.upstream_id)
            for call in spent:
                record_side_call(gw, x, call.route, call.tokens, call.seconds)
            self._described = {**self._body, "messages": vision.described(messages, texts)}
        return self._described


async def _attempt(gw: Gateway, endpoint: str, body: dict[str, Any], route: Route, target: Target, x: Exchange,
                   responder: Responder, surface: Surface, timeout_s: float | None, first_token_s: float | None,
                   stream: bool, store: cache.Store | None) -> GatewayError | None:
    """One try against one target: None when it answered, the error when another try may help."""
    call = Call(endpoint, _for_target(gw, x, endpoint, body, route), x.upstream_id, x.headers,
                limits=upstreams(gw, x).limits_for(route.backend, timeout_s), api_key=upstream_key(x, route.backend),
                upload=x.upload)
    mark = gw.admission.enter(route.backend, target.model)
    if mark is None:  # the backend is full: wait for this key's turn
        mark = await _queued(gw, x, route.backend, target.model, timeout_s)
    started = time.perf_counter()
    charge_from(gw, x, route.backend, mark)
    failure = None
    try:
        if stream:
            failure = await surface.stream(gw, call, x, responder, first_token_s)
        else:
            original, tokens = await surface.answer(gw, call, x, responder)
            if store is not None:
                await gw.cache.put(store.key, endpoint=endpoint, scope=x.principal.key_id if x.principal else None,
                                   served=f"{route.backend}/{route.upstream_model}", body=original, tokens=tokens,
                                   ttl_s=store.ttl_s, context=store.context, vector=store.vector)
    except GatewayError as exc:
        retry = resilience.retryable(exc)
        gw.breakers.record(route.backend, ok=not resilience.breaker_failure(exc))
        gw.selector.observe(target, time.perf_counter() - started, ok=not retry)
        if not retry or x.streaming or (x.upload is not None and not x.upload.replayable):
            raise  # an answer began, or an upload's body went out and cannot be sent again
        return exc
    finally:
        compute_cost(gw, x)  # an attempt that failed before its answer was accounted ran on the machine too
        if x.failover is None or x.failover.note is None:  # (a stream that went on elsewhere: ended there)
            gw.breakers.end(route.backend, target.model)
            gw.admission.released(route.backend)  # the next waiter, if any, takes the place
    # A stream that failed after its first byte is answered (the client got an error event, no retry can
    # follow; or another target went on), but the backend failed all the same.
    if failure is None and x.failover is not None:
        failure = x.failover.failure
    gw.breakers.record(route.backend, ok=failure is None or not resilience.breaker_failure(failure))
    gw.selector.observe(target, time.perf_counter() - started, ok=failure is None or not resilience.retryable(failure))
    return None


async def _queued(gw: Gateway, x: Exchange, backend: str, model: str, timeout_s: float | None) -> float:
    """The attempt begins on ``backend`` after the key's turn in the queue (core/admission.py), waiting at most the
    request's own timeout. The share-clock mark of ``Breakers.begin``."""
    principal = x.principal
    key_id = principal.key_id if principal is not None else ANONYMOUS_ID
    mark, waited = await gw.admission.wait_turn(backend, model, key_id, principal.weight if principal else None,
                                                timeout_s)
    gw.metrics.admitted(backend, waited, (principal.key_id, principal.name) if principal is not None else None)
    return mark


def _unsupported(gw: Gateway, x: Exchange, endpoint: str, route: Route) -> GatewayError | None:
    """Why ``route`` cannot serve ``endpoint``, or None: its backend's capabilities, and (past chat and
    completions) what the backend says of the model itself (Ollama: an embedding model or not)."""
    said = None if endpoint in (CHAT, COMPLETIONS) else gw.catalog.capability(route, CAPABILITY_OF.get(endpoint, ""))
    if upstreams(gw, x).providers[route.backend].supports(endpoint) and said is not False:
        return None
    return GatewayError("unsupported", f"{route.upstream_model!r} on backend {route.backend!r} does not serve "
                        f"/v1/{endpoint}", param="model")

