"""The demo shop: a small in-memory API that the lab's bots attack and botwall protects.

It sits behind nginx (`lab.api.server`), so the TCP peer it sees is always the
proxy; the real client comes from the X-Forwarded-For and X-Forwarded-Port
headers nginx adds. The shop tells the botwall agent what happened at the
application level (failed logins, OTPs sent, checkouts) through an
`EventForwarder`, which never slows or fails the shop's own answer.

Run on its own with `uvicorn --factory lab.api.app:app_from_env`, configured by
SHOP_PRODUCTS, SHOP_EVENTS_URL and SHOP_EVENTS_TOKEN_FILE.
"""

from __future__ import annotations

import collections
import html
import ipaddress
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any, Final, Literal, TypeVar
from urllib.parse import parse_qsl

import httpx
from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError

log = logging.getLogger(__name__)

EventKind = Literal["login_success", "login_failure", "otp_sent", "checkout", "add_to_cart"]

PAGE_SIZE: Final = 20
PASSWORD: Final = "correct-horse"  # every account's password, known or not
MAX_BODY_BYTES: Final = 64 * 1024
# Sessions and carts live in memory; a flood of logins must not grow them forever.
MAX_SESSIONS: Final = 100_000
MAX_CARTS: Final = 100_000
SESSION_COOKIE: Final = "session"
CART_COOKIE: Final = "cart"
SESSION_TTL_S: Final = 3600

# The fixed accounts table; any other user name with the right password logs in too.
ACCOUNTS: Final[Mapping[str, Mapping[str, str]]] = {
    "alice": {"name": "Alice Martin", "email": "alice@shop.botwall.test", "since": "2021-03-14"},
    "bob": {"name": "Bob Nguyen", "email": "bob@shop.botwall.test", "since": "2022-07-02"},
    "carol": {"name": "Carol Diaz", "email": "carol@shop.botwall.test", "since": "2019-11-30"},
    "dave": {"name": "Dave Okafor", "email": "dave@shop.botwall.test", "since": "2023-01-09"},
}

_ADJECTIVES = (
    "Classic", "Compact", "Deluxe", "Eco", "Essential", "Everyday", "Heavy-Duty", "Lightweight",
    "Modern", "Nordic", "Premium", "Rugged", "Smart", "Urban", "Vintage", "Wireless",
)  # fmt: skip
_MATERIALS = (
    "Aluminium", "Bamboo", "Canvas", "Ceramic", "Cotton", "Leather", "Linen", "Oak", "Steel",
    "Wool",
)  # fmt: skip
_ITEMS = {
    "kitchen": ("Kettle", "Mug", "Teapot", "Cutting Board", "Pan", "Spice Rack"),
    "office": ("Desk Lamp", "Notebook", "Pen Holder", "Monitor Stand", "Backpack"),
    "outdoor": ("Water Bottle", "Tent", "Camp Chair", "Lantern", "Hiking Pole"),
    "home": ("Throw Blanket", "Cushion", "Plant Pot", "Wall Clock", "Doormat", "Candle"),
}
_WAREHOUSES = ("AMS-1", "FRA-2", "MAD-1")

# What the shop calls a phone number: optional '+', 8 to 15 digits (E.164's
# length), after dropping the spaces, dashes, dots and parentheses people type.
_PHONE_SEPARATORS = re.compile(r"[\s\-.()]")
_PHONE = re.compile(r"\+?[0-9]{8,15}")


# -- the catalogue -------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    id: int
    name: str
    category: str
    price_cents: int
    stock: int
    warehouse: str

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "category": self.category,
            "price_cents": self.price_cents,
            "currency": "EUR",
        }


def make_catalogue(count: int, seed: int) -> list[Product]:
    """`count` products with names, prices and stock that depend only on `seed`."""
    if count < 1:
        raise ValueError(f"the shop needs at least one product, got {count}")
    rng = random.Random(seed)
    categories = sorted(_ITEMS)
    products = []
    for product_id in range(1, count + 1):
        category = rng.choice(categories)
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_MATERIALS)} {rng.choice(_ITEMS[category])}"
        products.append(
            Product(
                id=product_id,
                name=name,
                category=category,
                price_cents=rng.randrange(199, 19_999, 10),  # ends in 9, like a shop's
                stock=rng.choice((0, *range(1, 250))),
                warehouse=rng.choice(_WAREHOUSES),
            )
        )
    return products


def matches(product: Product, query: str) -> bool:
    """True when every word of `query` appears in the product's name (any case)."""
    name = product.name.lower()
    return all(word in name for word in query.lower().split())


# -- the shop's own OTP limits -------------------------------------------------


class OtpLimiter:
    """At most `per_number` codes per phone number per `number_window_s`, and at
    most `overall` codes per `overall_window_s` across all numbers.

    Not thread-safe on its own: the shop calls it under its state lock.
    """

    def __init__(
        self,
        *,
        per_number: int = 3,
        number_window_s: float = 600.0,
        overall: int = 30,
        overall_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_number = per_number
        self.number_window_s = number_window_s
        self.overall = overall
        self.overall_window_s = overall_window_s
        self.clock = clock
        self._by_number: dict[str, collections.deque[float]] = {}
        self._all: collections.deque[float] = collections.deque()

    def try_send(self, number: str) -> float | None:
        """Record a send and return None if allowed, else the seconds until one would be."""
        now = self.clock()
        _forget_before(self._all, now - self.overall_window_s)
        sent = self._by_number.setdefault(number, collections.deque())
        _forget_before(sent, now - self.number_window_s)
        if len(sent) >= self.per_number:
            return sent[0] + self.number_window_s - now
        if len(self._all) >= self.overall:
            if not sent:
                del self._by_number[number]
            return self._all[0] + self.overall_window_s - now
        sent.append(now)
        self._all.append(now)
        if len(self._by_number) > 10 * self.overall:
            self._forget_idle_numbers(now)
        return None

    def _forget_idle_numbers(self, now: float) -> None:
        # A number's history matters only within its window; without this
        # sweep, every number ever seen would stay in memory.
        cutoff = now - self.number_window_s
        for number in [n for n, sent in self._by_number.items() if sent[-1] < cutoff]:
            del self._by_number[number]


def _forget_before(times: collections.deque[float], cutoff: float) -> None:
    while times and times[0] < cutoff:
        times.popleft()


# -- application events to the botwall agent -----------------------------------


class EventForwarder:
    """Sends the shop's application events to the botwall agent (POST {url}/v1/events).

    `report()` only puts the event on a bounded queue and returns at once; one
    background thread sends them. When the queue is full or the agent does not
    answer, the event is dropped and counted: the shop's answer never waits
    for, or fails because of, the agent.
    """

    def __init__(
        self, url: str, token: str, *, queue_size: int = 1024, timeout: float = 2.0
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"events URL must start with http:// or https://, got {url!r}")
        if not token:
            raise ValueError("the agent's API token is empty")
        self.url = url.rstrip("/") + "/v1/events"
        self.timeout = timeout
        self._token = token
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # queued or being sent; flush() waits for zero
        self._counts = {
            "sent": 0,
            "rejected": 0,  # the agent answered, but not with 2xx (a bad token, say)
            "dropped_queue_full": 0,
            "dropped_unreachable": 0,
            "dropped_at_close": 0,
        }
        self._last_outcome = "sent"  # the worker warns once each time delivery turns bad
        self._thread = threading.Thread(target=self._run, name="shop-events", daemon=True)
        self._thread.start()

    def report(self, client: str, port: int, kind: EventKind) -> bool:
        """Queue one event; False (and counted) when it had to be dropped."""
        with self._lock:
            if self._stop.is_set():
                self._counts["dropped_at_close"] += 1
                return False
            try:
                self._queue.put_nowait({"client": client, "port": port, "kind": kind})
            except queue.Full:
                self._counts["dropped_queue_full"] += 1
                return False
            self._pending += 1
        return True

    def stats(self) -> dict[str, int]:
        """Counters: sent, rejected, dropped_queue_full, dropped_unreachable, dropped_at_close."""
        with self._lock:
            return dict(self._counts)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was sent or dropped; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Give queued events up to `timeout` seconds to go out, then stop. Safe to call twice."""
        if not self._stop.is_set():
            self.flush(timeout)
            self._stop.set()
        self._thread.join(timeout=self.timeout + 1.0)
        stats = self.stats()
        if stats["sent"] != sum(stats.values()):
            # The shop process's only record of what the agent never saw.
            log.warning("events to %s not all delivered: %s", self.url, stats)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        with httpx.Client(timeout=self.timeout, headers=headers) as client:
            while not self._stop.is_set():
                try:
                    event = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                self._done(self._send(client, event))
        while True:  # whatever is left after close() is dropped, and said so
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._done("dropped_at_close")

    def _send(self, client: httpx.Client, event: dict[str, Any]) -> str:
        try:
            response = client.post(self.url, json=event)
        # Anything at all: this thread must outlive every failure of the agent.
        except Exception as exc:
            outcome, why = "dropped_unreachable", f"unreachable: {exc}"
        else:
            outcome = "sent" if response.is_success else "rejected"
            why = f"refused the event: {response.status_code} {response.text[:200]}"
        if outcome != "sent" and outcome != self._last_outcome:
            # Once per change, not per event: a dead agent under a flood
            # would otherwise fill the shop's stderr.
            log.warning("botwall agent at %s %s; the like are only counted now", self.url, why)
        self._last_outcome = outcome
        return outcome

    def _done(self, outcome: str) -> None:
        with self._idle:
            self._counts[outcome] += 1
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()


def forwarded_client(headers: Mapping[str, str]) -> tuple[str, int] | None:
    """The real client (address, source port) named by the proxy, or None.

    Only the last X-Forwarded-For entry counts: nginx appended it; anything
    before it is whatever the client itself claimed.
    """
    forwarded_for = headers.get("x-forwarded-for")
    forwarded_port = headers.get("x-forwarded-port", "")
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    if not forwarded_for or not re.fullmatch(r"[0-9]{1,5}", forwarded_port):
        return None
    try:
        address = ipaddress.ip_address(forwarded_for.split(",")[-1].strip())
    except ValueError:
        return None
    port = int(forwarded_port)
    if not 0 < port < 65536:
        return None
    return str(address), port


# -- the shop's state ----------------------------------------------------------


class ShopState:
    """Sessions, carts, OTP limits and orders; every access under one lock.

    uvicorn runs the async routes on one event loop, but the lock keeps the
    state safe for sync routes (run on a thread pool) and for tests.
    """

    def __init__(self, catalogue: list[Product]) -> None:
        self.catalogue = catalogue
        self.lock = threading.Lock()
        self.sessions: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.carts: collections.OrderedDict[str, dict[int, int]] = collections.OrderedDict()
        self.otp = OtpLimiter()
        self.orders = 0

    def product(self, product_id: int) -> Product:
        if not 1 <= product_id <= len(self.catalogue):
            raise HTTPException(404, f"product {product_id} not found")
        return self.catalogue[product_id - 1]

    def cart_view(self, cart: Mapping[int, int]) -> dict[str, Any]:
        items = []
        for product_id, qty in cart.items():
            product = self.catalogue[product_id - 1]
            items.append({**product.summary(), "qty": qty})
        total = sum(item["price_cents"] * item["qty"] for item in items)
        return {"items": items, "total_cents": total, "currency": "EUR"}


def _remember(table: collections.OrderedDict[str, Any], key: str, value: Any, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


# -- request bodies ------------------------------------------------------------


class LoginBody(BaseModel):
    user: str = Field(min_length=1, max_length=100)
    password: str = Field(max_length=200)


class CartBody(BaseModel):
    product: int
    qty: int = Field(1, ge=1, le=99)


class OtpBody(BaseModel):
    phone: str = Field(max_length=40)


BodyModel = TypeVar("BodyModel", bound=BaseModel)


async def read_body(request: Request, model: type[BodyModel]) -> BodyModel:
    """The POST body, JSON or form-urlencoded, validated as `model`.

    Forms are parsed here rather than by FastAPI's Form(): that needs
    python-multipart, a dependency for two content types we can read ourselves.
    Malformed bodies are a 400; well-formed ones with bad fields a 422.
    """
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: Any
    if media_type == "application/json":
        try:
            fields = json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            raise HTTPException(400, "body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise HTTPException(400, "body must be a JSON object")
    elif media_type == "application/x-www-form-urlencoded":
        try:
            fields = dict(parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=20))
        except ValueError:
            raise HTTPException(400, "body is not a valid form") from None
    else:
        raise HTTPException(
            415,
            "send application/json or application/x-www-form-urlencoded, "
            f"not {media_type or 'a body without Content-Type'}",
        )
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=fields) from None


# -- the application -----------------------------------------------------------


def create_app(products: int = 500, seed: int = 7, events: EventForwarder | None = None) -> FastAPI:
    """The shop with `products` products named from `seed`; events go to `events` if given.

    The app owns `events` from here on: it closes the forwarder at shutdown.
    """
    state = ShopState(make_catalogue(products, seed))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if events is not None:
            events.close()

    app = FastAPI(
        title="botwall demo shop",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.shop = state
    app.state.events = events

    def report(request: Request, kind: EventKind) -> None:
        if events is None:
            return
        client = forwarded_client(request.headers)
        if client is not None:
            events.report(client[0], client[1], kind)

    def set_cookie(request: Request, response: Response, name: str, value: str) -> None:
        # Secure only when the client's own hop was HTTPS: behind nginx the
        # shop itself is plain HTTP, and tests talk to it in plain HTTP too.
        secure = request.headers.get("x-forwarded-proto") == "https"
        response.set_cookie(name, value, httponly=True, samesite="lax", secure=secure)

    @app.get("/", response_class=HTMLResponse)
    async def home() -> str:
        rows = "\n".join(
            f'<li><a href="/products/{p.id}">{html.escape(p.name)}</a>'
            f" {p.price_cents / 100:.2f} EUR</li>"
            for p in state.catalogue[:8]
        )
        return (
            "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            "<title>Botwall Demo Shop</title></head>\n<body><h1>Botwall Demo Shop</h1>\n"
            f"<ul>\n{rows}\n</ul>\n<p><a href=/products>All products</a></p></body></html>\n"
        )

    @app.get("/products")
    async def list_products(
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
        q: Annotated[str, Query(max_length=100)] = "",
    ) -> dict[str, Any]:
        found = [p for p in state.catalogue if matches(p, q)] if q else state.catalogue
        start = (page - 1) * PAGE_SIZE
        return {
            "page": page,
            "per_page": PAGE_SIZE,
            "total": len(found),
            "pages": math.ceil(len(found) / PAGE_SIZE),
            "items": [p.summary() for p in found[start : start + PAGE_SIZE]],
        }

    @app.get("/products/{product_id}")
    async def get_product(product_id: Annotated[int, Path()]) -> dict[str, Any]:
        product = state.product(product_id)
        return {**product.summary(), "in_stock": product.stock > 0}

    @app.get("/search")
    async def search(q: Annotated[str, Query(min_length=1, max_length=100)]) -> dict[str, Any]:
        found = [p for p in state.catalogue if matches(p, q)]
        return {
            "query": q,
            "count": len(found),
            "items": [p.summary() for p in found[:PAGE_SIZE]],
        }

    @app.get("/inventory/{product_id}")
    async def inventory(product_id: Annotated[int, Path()]) -> dict[str, Any]:
        product = state.product(product_id)
        return {"product": product.id, "in_stock": product.stock, "warehouse": product.warehouse}

    @app.post("/login")
    async def login(request: Request) -> Response:
        body = await read_body(request, LoginBody)
        if not secrets.compare_digest(body.password.encode(), PASSWORD.encode()):
            report(request, "login_failure")
            return JSONResponse({"detail": "bad credentials"}, status_code=401)
        token = secrets.token_urlsafe(24)
        with state.lock:
            _remember(state.sessions, token, body.user, MAX_SESSIONS)
        report(request, "login_success")
        response = JSONResponse({"user": body.user, "expires_in": SESSION_TTL_S})
        set_cookie(request, response, SESSION_COOKIE, token)
        return response

    @app.get("/account")
    async def account(request: Request) -> dict[str, Any]:
        token = request.cookies.get(SESSION_COOKIE, "")
        with state.lock:
            user = state.sessions.get(token)
        if user is None:
            raise HTTPException(401, "not logged in")
        known = ACCOUNTS.get(user)
        return {
            "user": user,
            "name": known["name"] if known else user,
            "email": known["email"] if known else f"{user}@example.test",
            "member_since": known["since"] if known else None,
        }

    @app.post("/cart")
    async def add_to_cart(request: Request) -> Response:
        body = await read_body(request, CartBody)
        product = state.product(body.product)
        cart_id = request.cookies.get(CART_COOKIE, "")
        with state.lock:
            # Only ids the shop issued count: an unknown cookie gets a new cart.
            new_cart = cart_id not in state.carts
            if new_cart:
                cart_id = secrets.token_urlsafe(16)
                _remember(state.carts, cart_id, {}, MAX_CARTS)
            cart = state.carts[cart_id]
            cart[product.id] = min(cart.get(product.id, 0) + body.qty, 99)
            view = state.cart_view(cart)
        report(request, "add_to_cart")
        response = JSONResponse(view)
        if new_cart:
            set_cookie(request, response, CART_COOKIE, cart_id)
        return response

    @app.get("/cart")
    async def get_cart(request: Request) -> dict[str, Any]:
        with state.lock:
            cart = state.carts.get(request.cookies.get(CART_COOKIE, ""), {})
            return state.cart_view(cart)

    @app.post("/checkout")
    async def checkout(request: Request) -> dict[str, Any]:
        with state.lock:
            cart = state.carts.get(request.cookies.get(CART_COOKIE, ""))
            if not cart:
                raise HTTPException(400, "cart is empty")
            view = state.cart_view(cart)
            cart.clear()
            state.orders += 1
            order = f"ord-{state.orders:06d}"
        report(request, "checkout")
        return {"order": order, **view}

    @app.post("/otp/send")
    async def send_otp(request: Request) -> Response:
        body = await read_body(request, OtpBody)
        number = _PHONE_SEPARATORS.sub("", body.phone)
        if not _PHONE.fullmatch(number):
            raise HTTPException(400, f"{body.phone!r} is not a phone number")
        number = number.lstrip("+")
        with state.lock:
            wait_s = state.otp.try_send(number)
        if wait_s is not None:
            return JSONResponse(
                {"detail": "too many codes requested, try again later"},
                status_code=429,
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
        report(request, "otp_sent")
        return JSONResponse({"sent": True, "phone": f"+{'*' * (len(number) - 2)}{number[-2:]}"})

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        """What the shop learnt of the client from the proxy; for the lab's tests, and harmless."""
        client = forwarded_client(request.headers)
        return {
            "client": client[0] if client else None,
            "port": client[1] if client else None,
            "proto": request.headers.get("x-forwarded-proto"),
            "peer": request.client.host if request.client else None,
            # Of the hop into the shop: "1.0" behind the lab's nginx.
            "http_version": request.scope.get("http_version"),
        }

    return app


class ShopConfigError(ValueError):
    """The shop's environment variables do not make a valid configuration."""


def app_from_env(environ: Mapping[str, str] | None = None) -> FastAPI:
    """The shop configured from SHOP_PRODUCTS, SHOP_EVENTS_URL and SHOP_EVENTS_TOKEN_FILE.

    For `uvicorn --factory lab.api.app:app_from_env`. The token comes from a
    file, not from the environment, so it never shows in `ps e` or /proc.
    """
    env = os.environ if environ is None else environ
    raw_products = env.get("SHOP_PRODUCTS", "500")
    try:
        products = int(raw_products)
    except ValueError:
        raise ShopConfigError(
            f"SHOP_PRODUCTS must be a whole number, got {raw_products!r}"
        ) from None
    url = env.get("SHOP_EVENTS_URL", "")
    token_file = env.get("SHOP_EVENTS_TOKEN_FILE", "")
    if bool(url) != bool(token_file):
        raise ShopConfigError(
            "SHOP_EVENTS_URL and SHOP_EVENTS_TOKEN_FILE go together: the agent needs its token"
        )
    events = None
    if url:
        try:
            token = FilePath(token_file).read_text().strip()
        except OSError as exc:
            raise ShopConfigError(
                f"cannot read SHOP_EVENTS_TOKEN_FILE {token_file}: {exc}"
            ) from exc
        events = EventForwarder(url, token)
    return create_app(products=products, events=events)
