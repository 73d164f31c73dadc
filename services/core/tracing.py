"""OpenTelemetry traces for every service: on when the standard `OTEL_*` variables ask for them, free otherwise.

One trace per request spans gateway → scheduler → worker, continuing a caller's W3C `traceparent`:

- Calls that carry one request each (the public `Generate`, `Complete` and `Embed`, and the internal `Embed`
  hops) are traced by OpenTelemetry's gRPC instrumentation, which carries the trace context in gRPC metadata.
  The long-lived streams (`Dispatch`, `Execute`, heartbeats, the expert exchange) are left out: one span per
  stream would last for hours and say nothing about a request.
- Generation work travels inside the multiplexed `Dispatch` and `Execute` streams, whose metadata belongs to the
  stream, not to a request; there the context rides in the work itself (`GenerationWork.trace_context`, the W3C
  fields as a map) and each service opens its span for the request from it (`RequestTrace`).

Turning it on: `OTEL_TRACES_EXPORTER=otlp` (or `console`), or an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) without `OTEL_TRACES_EXPORTER=none`; `OTEL_SDK_DISABLED=true` wins over
both. The exporter, sampler (`OTEL_TRACES_SAMPLER`), batching (`OTEL_BSP_*`) and resource
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) read their standard variables. Off, no interceptor is
installed and `request_trace` hands out one shared no-op object: a request costs a dictionary lookup or two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

# The methods that carry exactly one request: these get their span from the gRPC instrumentation.
TRACED_METHODS = (
    "/moemesh.v1.Generation/Generate",
    "/moemesh.v1.Generation/Complete",
    "/moemesh.v1.Embeddings/Embed",
    "/moemesh.v1.Scheduler/Embed",
    "/moemesh.v1.Worker/Embed",
)
TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
TRACE_FIELDS = ("traceparent", "tracestate")  # the W3C trace context's fields, as carried in work and metadata


@dataclass
class _State:
    service: str = ""
    enabled: bool = False
    provider: object | None = None  # the TracerProvider spans come from (the global one once set up)

    cached_tracer: object | None = None  # built from `provider` on first use (see `use`)

    def use(self, enabled: bool, provider: object | None) -> None:
        self.enabled, self.provider, self.cached_tracer = enabled, provider, None

    def tracer(self):
        if self.cached_tracer is None:
            from opentelemetry import trace
            self.cached_tracer = trace.get_tracer("moemesh", tracer_provider=self.provider)
        return self.cached_tracer


# The process's tracing switch, set once at start-up by `setup_tracing` (OpenTelemetry's provider is
# process-wide too); everything else reads it.
_state = _State()


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the standard variables in `env` ask for traces (see the module docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter not in ("none", "")
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Install the process's tracer provider when `env` (default: the environment) asks for traces; whether it did.

    The resource is named `moemesh-<service>` unless OTEL_SERVICE_NAME names it. Spans are exported in batches
    on a background thread; `shutdown_tracing` flushes what is left.
    """
    env = os.environ if env is None else env
    _state.service = service
    if not tracing_requested(env):
        _state.use(False, None)
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or f"moemesh-{service}"})
    provider = TracerProvider(resource=resource)
    for exporter in _exporters(env):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the gRPC and FastAPI instrumentation use the global provider
    _state.use(True, provider)
    log.info("tracing on: spans exported by %s", env.get("OTEL_TRACES_EXPORTER") or "otlp")
    return True


def _exporters(env: Mapping[str, str]) -> list:
    names = [n.strip().lower() for n in (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",") if n.strip()]
    exporters = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            exporters.append(OTLPSpanExporter())  # endpoint, headers, TLS, timeout: the OTEL_EXPORTER_OTLP_* variables
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            exporters.append(ConsoleSpanExporter())
        else:
            raise SystemExit(f"OTEL_TRACES_EXPORTER: {name!r} is not supported here (otlp, console or none)")
    return exporters


def shutdown_tracing() -> None:
    """Flush and stop the exporters (at the end of a service's life)."""
    if not _state.enabled:
        return
    shutdown = getattr(_state.provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def enabled() -> bool:
    return _state.enabled


@contextlib.contextmanager
def traced_by(provider) -> Iterator[None]:
    """Within the block, this process's request spans come from `provider` (a test's, with an in-memory
    exporter) as if tracing were set up; the previous state after it."""
    saved = (_state.enabled, _state.provider)
    _state.use(True, provider)
    try:
        yield
    finally:
        _state.use(*saved)


def _request_filter():
    from opentelemetry.instrumentation.grpc import filters
    return filters.any_of(*(filters.full_method_name(name) for name in TRACED_METHODS))


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The tracing interceptor for a gRPC server (spans for `TRACED_METHODS` only); none when tracing is off."""
    if not _state.enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    return [aio_server_interceptor(filter_=_request_filter())]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The tracing interceptors for a channel to another service (they inject the trace context into the
    metadata of `TRACED_METHODS` calls); none when tracing is off."""
    if not _state.enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    return list(aio_client_interceptors(filter_=_request_filter()))


MAX_TRACESTATE = 512  # characters: W3C's limit on what a vendor list must hold


def incoming_context(pairs: Sequence[tuple[str, str]] | Mapping[str, str]) -> dict[str, str]:
    """The W3C trace fields among headers or gRPC metadata (names in lower case), as a carrier: a well-formed
    `traceparent` and, beside it, a `tracestate` of at most 512 characters. Anything else a caller sends is
    dropped here (it would ride in every hop's work message and log line), and the trace starts afresh."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    fields = {key: value for key, value in items if key in TRACE_FIELDS and isinstance(value, str)}
    if not TRACEPARENT.fullmatch(fields.get("traceparent", "")):
        return {}
    if len(fields.get("tracestate", "")) > MAX_TRACESTATE:
        del fields["tracestate"]
    return fields


def trace_id_of(carrier: Mapping[str, str]) -> str:
    """The trace id a carrier's `traceparent` names ("" when it has none or a malformed one)."""
    match = TRACEPARENT.fullmatch(carrier.get("traceparent", ""))
    return match.group(1) if match and match.group(1) != "0" * 32 else ""


class RequestTrace:
    """One request's span in one service, with the phases it passes through as child spans.

    Opened from the carrier the request arrived with (its parent); `inject` writes this span's context into the
    carrier handed to the next service. With tracing off, `request_trace` returns `NO_TRACE`, whose methods do
    nothing and which passes the caller's carrier on unchanged (so logs still carry a caller's trace id).
    """

    def __init__(self, name: str, carrier: Mapping[str, str] | None, attributes: dict, kind: str = "SERVER") -> None:
        from opentelemetry import propagate, trace
        self._tracer = _state.tracer()
        parent = propagate.extract(dict(carrier)) if carrier is not None else None  # None: the active span
        self.span = self._tracer.start_span(name, context=parent, kind=trace.SpanKind[kind], attributes=attributes)
        self._context = trace.set_span_in_context(self.span)
        self._phase = None
        self.trace_id = format(self.span.get_span_context().trace_id, "032x")

    def phase(self, name: str, attributes: dict | None = None) -> None:
        """End the current phase (if any) and start `name` as a child span of the request's."""
        self._end_phase()
        self._phase = self._tracer.start_span(name, context=self._context, attributes=attributes)

    def event(self, name: str, attributes: dict | None = None) -> None:
        """A point in the request's life (queued, dispatched, first token, failover...)."""
        self.span.add_event(name, attributes or {})

    def inject(self, carrier: MutableMapping[str, str]) -> None:
        """Write this span's context into `carrier` (the next service's parent)."""
        from opentelemetry import propagate
        carrier.clear()
        propagate.inject(carrier, context=self._context)

    def end(self, attributes: dict | None = None, error: str | None = None) -> None:
        """End the phase and the request's span, with its outcome (`error`: a status name and message)."""
        from opentelemetry.trace import Status, StatusCode
        phase, self._phase = self._phase, None
        if phase is not None:
            if attributes and phase.is_recording():
                phase.set_attributes(attributes)
            phase.end()
        if attributes:
            self.span.set_attributes(attributes)
        if error:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()

    def _end_phase(self) -> None:
        if self._phase is not None:
            self._phase.end()
            self._phase = None


class NoTrace:
    """What `request_trace` gives when tracing is off: every method does nothing."""

    span = None

    def phase(self, name: str, attributes: dict | None = None) -> None:
        pass

    def event(self, name: str, attributes: dict | None = None) -> None:
        pass

    def inject(self, carrier: MutableMapping[str, str]) -> None:
        pass  # the caller's context (if any) travels on as it came

    def end(self, attributes: dict | None = None, error: str | None = None) -> None:
        pass


NO_TRACE = NoTrace()


def request_trace(name: str, carrier: Mapping[str, str] | None, attributes: dict,
                  kind: str = "SERVER") -> RequestTrace | NoTrace:
    """The request's span in this service (a child of the carrier's context, or of the active span when `carrier`
    is None), or `NO_TRACE` when tracing is off. `kind`: SERVER where the request arrives, CLIENT where it is
    sent on."""
    if not _state.enabled:
        return NO_TRACE
    return RequestTrace(name, carrier, attributes, kind)


def span(name: str, attributes: dict | None = None, links: Sequence[object] = ()):
    """A child span of the active one around a block (a context manager; does nothing when tracing is off).

    `links`: span contexts (`current_span_context`) of other requests the block also serves (a merged batch).
    """
    if not _state.enabled:
        return contextlib.nullcontext()
    from opentelemetry import trace
    return _state.tracer().start_as_current_span(
        name, attributes=attributes, links=[trace.Link(context) for context in links if context is not None])


def current_span_context() -> object | None:
    """The active span's context, to link to from a span that serves this request with others (None when off)."""
    if not _state.enabled:
        return None
    from opentelemetry import trace
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def current_trace_id() -> str:
    """The trace id of the span active in this context ("" when none, or tracing is off)."""
    if not _state.enabled:
        return ""
    from opentelemetry import trace
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def current_carrier() -> dict[str, str]:
    """The active span's context as W3C fields (empty when none, or tracing is off)."""
    if not _state.enabled:
        return {}
    from opentelemetry import propagate
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
