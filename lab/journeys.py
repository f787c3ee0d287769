"""The shape of a human visit to the lab shop, shared by every human client (browser and app).

A plan is a list of `Step`s drawn from a seeded `random.Random`, so a run is
repeatable: the clients only carry it out (and emit one `lab.records`
record per step) and never decide what a human does next themselves.

Think times are log-normal: most pauses last a few seconds, a few last much
longer (reading a product page, fetching a credit card), and none lasts more
than a cap. A bot's pauses are regular or absent; these are what the models
learn as normal. `think_scale` multiplies every pause so a short demo can
compress a visit without changing its shape.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote_plus

PRODUCTS = 500  # the shop's catalogue: /products/1 .. /products/500
PAGE_SIZE = 20  # products per /products?page=N

# -- the web shopper (plan_visit) ---------------------------------------------
P_INVENTORY = 0.30  # a product page is followed by its stock check
P_LOGIN = 0.35  # logs in after browsing (also, always, before a checkout)
P_TYPO = 0.15  # a login starts with a mistyped password (401), then the right one
P_ACCOUNT = 0.50  # once logged in (while browsing), looks at /account
P_CART = 0.45  # adds a product it looked at to the cart
P_VIEW_CART = 0.70  # after adding, opens the cart
P_CHECKOUT = 0.75  # after adding, checks out
THINK_MEDIAN_S = 2.5
THINK_SIGMA = 0.9  # of the log: ~1 in 10 pauses is over 3x the median
THINK_CAP_S = 20.0

# -- the mobile-app shopper (plan_app_visit) ----------------------------------
P_APP_NEXT_PAGE = 0.5  # scrolls on to the next page of the product list (at most 3 pages)
P_APP_INVENTORY = 0.25
P_APP_CART = 0.55
P_APP_CHECKOUT = 0.80
APP_THINK_MEDIAN_S = 1.5  # taps are quicker than page loads and reading
APP_THINK_SIGMA = 0.8
APP_THINK_CAP_S = 12.0

PASSWORD = "correct-horse"  # the lab shop's one right password
SEARCH_TERMS = (
    "usb cable", "headphones", "coffee", "kettle", "running shoes", "desk lamp",
    "backpack", "phone case", "charger", "notebook", "water bottle", "keyboard",
    "socks", "umbrella", "tea", "monitor", "mouse", "blender", "jacket", "hdmi",
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One request of a visit, and how long the human pauses before the next one."""

    method: str
    path: str
    # Sent as JSON; None sends no body. Left out of the hash (a dict has none).
    body: dict[str, Any] | None = field(default=None, hash=False)
    think_s: float = 0.0  # seconds between this answer and the next request (0 after the last)
    expect_ok: bool = True  # False for a mistyped login, which the shop answers 401


def think_time(
    rng: random.Random,
    *,
    median_s: float = THINK_MEDIAN_S,
    sigma: float = THINK_SIGMA,
    cap_s: float = THINK_CAP_S,
    think_scale: float = 1.0,
) -> float:
    """A human pause: log-normal with this median, capped, then scaled."""
    return min(rng.lognormvariate(math.log(median_s), sigma), cap_s) * think_scale


def product_id(rng: random.Random, products: int = PRODUCTS) -> int:
    """A product a human opens: 60% from the first tenth of the catalogue
    (what the front page and the first search results show), 40% anywhere."""
    popular = max(1, products // 10)
    if rng.random() < 0.6:
        return rng.randint(1, popular)
    return rng.randint(1, products)


def mistype(password: str, rng: random.Random) -> str:
    """The password as a hurried human gets it wrong: a swap, a miss, a slip or caps."""
    i = rng.randrange(len(password) - 1)
    kind = rng.randrange(4)
    if kind == 0:  # two neighbours swapped (equal neighbours would be no typo)
        if password[i] != password[i + 1]:
            return password[:i] + password[i + 1] + password[i] + password[i + 2 :]
        return password[:i] + password[i + 1 :]
    if kind == 1:  # a key missed
        return password[:i] + password[i + 1 :]
    if kind == 2:  # an extra key
        return password[:i] + rng.choice(string.ascii_lowercase) + password[i:]
    return password.capitalize() if password[0].islower() else password.lower()


def _login_steps(rng: random.Random, user: str) -> list[Step]:
    steps = []
    if rng.random() < P_TYPO:
        wrong = {"user": user, "password": mistype(PASSWORD, rng)}
        steps.append(Step("POST", "/login", wrong, expect_ok=False))
    steps.append(Step("POST", "/login", {"user": user, "password": PASSWORD}))
    return steps


def _with_pauses(steps: list[Step], pause: Callable[[], float]) -> list[Step]:
    """The steps with a fresh pause after each one but the last."""
    return [replace(s, think_s=pause()) for s in steps[:-1]] + [steps[-1]]


def plan_visit(
    rng: random.Random, *, products: int = PRODUCTS, think_scale: float = 1.0
) -> list[Step]:
    """A shopper's visit to the web shop, as the browser makes it.

    Always: GET / (the HTML home page), then one GET /search?q=<term>, then 1-4
    product pages GET /products/{id} (uniform count; ids skewed to the popular
    tenth, see `product_id`), each followed by GET /inventory/{id} with
    probability P_INVENTORY (30%).

    Then, independently:
    - with P_LOGIN (35%) logs in while browsing: POST /login {"user",
      "password"}; in P_TYPO (15%) of all logins a mistyped password comes
      first (401, `expect_ok` False), then the right one; once logged in this
      way, GET /account with P_ACCOUNT (50%);
    - with P_CART (45%) adds one of the products it looked at: POST /cart
      {"product": id, "qty": 1 (80%), 2 (15%) or 3 (5%)}, opens GET /cart with
      P_VIEW_CART (70%), and checks out with P_CHECKOUT (75%): POST /checkout,
      after logging in first if it has not yet (the shop wants an account to
      pay), so about 34% of visits check out.

    About 57% of visits log in at all. Each pause is `think_time` (log-normal,
    median THINK_MEDIAN_S 2.5 s, capped at THINK_CAP_S 20 s) times
    `think_scale`; the last step has none. A visit has 3 to 16 requests.
    """
    user = f"shopper{rng.randrange(1, 10_000)}@mail.test"
    steps = [Step("GET", "/"), Step("GET", "/search?q=" + quote_plus(rng.choice(SEARCH_TERMS)))]
    seen = []
    for _ in range(rng.randint(1, 4)):
        pid = product_id(rng, products)
        seen.append(pid)
        steps.append(Step("GET", f"/products/{pid}"))
        if rng.random() < P_INVENTORY:
            steps.append(Step("GET", f"/inventory/{pid}"))
    logged_in = False
    if rng.random() < P_LOGIN:
        steps += _login_steps(rng, user)
        logged_in = True
        if rng.random() < P_ACCOUNT:
            steps.append(Step("GET", "/account"))
    if rng.random() < P_CART:
        qty = rng.choices((1, 2, 3), weights=(80, 15, 5))[0]
        steps.append(Step("POST", "/cart", {"product": rng.choice(seen), "qty": qty}))
        if rng.random() < P_VIEW_CART:
            steps.append(Step("GET", "/cart"))
        if rng.random() < P_CHECKOUT:
            if not logged_in:
                steps += _login_steps(rng, user)
            steps.append(Step("POST", "/checkout"))
    return _with_pauses(steps, lambda: think_time(rng, think_scale=think_scale))


def plan_app_visit(
    rng: random.Random, *, products: int = PRODUCTS, think_scale: float = 1.0
) -> list[Step]:
    """A shopper's session in the mobile app: JSON only, no HTML home page.

    The app holds the user's credentials, so it logs in once, first, and
    never mistypes: POST /login. Then GET /products?page=1, and on to page 2
    and 3 with P_APP_NEXT_PAGE (50%) each; 1-3 product pages GET
    /products/{id} (ids skewed as in `product_id`, within the pages seen half
    the time), each followed by GET /inventory/{id} with P_APP_INVENTORY
    (25%). With P_APP_CART (55%) POST /cart {"product", "qty": 1} then GET
    /cart, and with P_APP_CHECKOUT (80%) of those POST /checkout (44% of
    sessions). Pauses are shorter than on the web (log-normal, median
    APP_THINK_MEDIAN_S 1.5 s, capped at APP_THINK_CAP_S 12 s), times
    `think_scale`. A session has 3 to 13 requests.
    """
    user = f"shopper{rng.randrange(1, 10_000)}@mail.test"
    steps = [Step("POST", "/login", {"user": user, "password": PASSWORD})]
    pages = 1
    steps.append(Step("GET", "/products?page=1"))
    while pages < 3 and rng.random() < P_APP_NEXT_PAGE:
        pages += 1
        steps.append(Step("GET", f"/products?page={pages}"))
    listed = min(products, pages * PAGE_SIZE)
    seen = []
    for _ in range(rng.randint(1, 3)):
        pid = rng.randint(1, listed) if rng.random() < 0.5 else product_id(rng, products)
        seen.append(pid)
        steps.append(Step("GET", f"/products/{pid}"))
        if rng.random() < P_APP_INVENTORY:
            steps.append(Step("GET", f"/inventory/{pid}"))
    if rng.random() < P_APP_CART:
        steps.append(Step("POST", "/cart", {"product": rng.choice(seen), "qty": 1}))
        steps.append(Step("GET", "/cart"))
        if rng.random() < P_APP_CHECKOUT:
            steps.append(Step("POST", "/checkout"))

    def pause() -> float:
        return think_time(
            rng,
            median_s=APP_THINK_MEDIAN_S,
            sigma=APP_THINK_SIGMA,
            cap_s=APP_THINK_CAP_S,
            think_scale=think_scale,
        )

    return _with_pauses(steps, pause)
