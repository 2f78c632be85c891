"""A realistic demo base, deterministic for a seed and an as-of date.

What it holds: contacts with phone numbers in the messy forms CRMs keep (a few percent
foreign, landline, invalid or duplicated), Cyrillic and Latin names, cities across
Russia's time zones; a consent ledger (opt-ins with source and proof, some opt-outs);
orders with a long-tailed amount distribution; customer events; and three months of
campaign history (promo and service, A/B variants, holdouts) with outbox rows, provider
receipts (some out of order), tracked links, clicks (and the link previews and scanners
that fetch a few links seconds after delivery), replies (a few STOP) and orders that
follow them.

Every column real data can leave empty is empty in a small share of rows (:data:`GAPS`):
contacts without a name, gender, birth date, email, CRM id, city or number; orders without a
category; consent events without the wording or the proof; campaigns without a sender, a stored
policy or a schedule; messages to invalid numbers never rendered; replies tied to no message
or from numbers not in the base; clicks without a user agent, or recorded before the redirect
kept the agent and the method. The pages are tested on them (tests/test_pages_nulls.py).

Generation is vectorised with numpy; the result is written to a temporary file that
replaces the store only when complete, so a crash never leaves half a demo behind.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from smsops import encoding, phones, store
from smsops.config import paths
from smsops.reference import cities, sms_prices

# ---------------------------------------------------------------------------------------
# Vocabulary

MALE_FIRST = (
    "Александр", "Алексей", "Андрей", "Антон", "Артём", "Борис", "Вадим", "Валерий", "Василий",
    "Виктор", "Владимир", "Владислав", "Вячеслав", "Геннадий", "Георгий", "Григорий", "Денис",
    "Дмитрий", "Евгений", "Егор", "Иван", "Игорь", "Илья", "Кирилл", "Константин", "Леонид",
    "Максим", "Марк", "Матвей", "Михаил", "Никита", "Николай", "Олег", "Павел", "Пётр", "Роман",
    "Руслан", "Сергей", "Станислав", "Степан", "Тимур", "Фёдор", "Юрий", "Ярослав",
)  # fmt: skip
FEMALE_FIRST = (
    "Александра", "Алина", "Алиса", "Алла", "Анастасия", "Анна", "Валентина", "Валерия", "Вера",
    "Вероника", "Виктория", "Галина", "Дарья", "Диана", "Евгения", "Екатерина", "Елена",
    "Елизавета", "Жанна", "Зоя", "Инна", "Ирина", "Карина", "Кристина", "Ксения", "Лариса",
    "Любовь", "Людмила", "Маргарита", "Марина", "Мария", "Надежда", "Наталья", "Нина", "Оксана",
    "Ольга", "Полина", "Светлана", "София", "Тамара", "Татьяна", "Ульяна", "Юлия", "Яна",
)  # fmt: skip
SURNAMES = (
    "Иванов", "Смирнов", "Кузнецов", "Попов", "Васильев", "Петров", "Соколов", "Михайлов",
    "Новиков", "Фёдоров", "Морозов", "Волков", "Алексеев", "Лебедев", "Семёнов", "Егоров",
    "Павлов", "Козлов", "Степанов", "Николаев", "Орлов", "Андреев", "Макаров", "Никитин",
    "Захаров", "Зайцев", "Соловьёв", "Борисов", "Яковлев", "Григорьев", "Романов", "Воробьёв",
    "Сергеев", "Кузьмин", "Фролов", "Александров", "Дмитриев", "Королёв", "Гусев", "Киселёв",
    "Ильин", "Максимов", "Поляков", "Сорокин", "Виноградов", "Ковалёв", "Белов", "Медведев",
    "Антонов", "Тарасов", "Жуков", "Баранов", "Филиппов", "Комаров", "Давыдов", "Беляев",
    "Герасимов", "Богданов", "Осипов", "Сидоров", "Матвеев", "Титов", "Марков", "Миронов",
    "Крылов", "Куликов", "Карпов", "Власов", "Мельников", "Денисов", "Гаврилов", "Тихонов",
    "Казаков", "Афанасьев", "Данилов", "Савельев", "Тимофеев", "Фомин", "Чернов", "Абрамов",
    "Мартынов", "Ефимов", "Федотов", "Щербаков", "Назаров", "Калинин", "Исаев", "Чернышёв",
    "Быков", "Маслов", "Родионов", "Коновалов", "Лазарев", "Воронин", "Климов", "Филатов",
    "Пономарёв", "Голубев", "Кудрявцев", "Прохоров", "Наумов", "Потапов", "Журавлёв", "Овчинников",
    "Трофимов", "Леонов", "Соболев", "Ермаков", "Колесников", "Гончаров", "Емельянов", "Никифоров",
    "Грачёв", "Котов", "Гришин", "Ефремов", "Архипов", "Громов", "Кириллов", "Малышев",
    "Панов", "Моисеев", "Румянцев", "Акимов", "Кондратьев", "Бирюков", "Горбунов", "Анисимов",
    "Еремин", "Тихомиров", "Галкин", "Лукьянов", "Михеев", "Скворцов", "Юдин", "Белоусов",
    "Нестеров", "Симонов", "Прокофьев", "Харитонов", "Князев", "Цветков", "Левин", "Митрофанов",
    "Воронов", "Аксёнов", "Софронов", "Мальцев", "Логинов", "Горшков", "Савин", "Краснов",
    "Майоров", "Демидов", "Елисеев", "Рыбаков", "Сафонов", "Плотников", "Демин", "Хохлов",
    "Жданов", "Островский", "Вишневский", "Шевченко", "Бондаренко", "Ким", "Ли", "Абдуллаев",
    "Гарипов", "Сафин", "Хабибуллин", "Алиев", "Мамедов", "Петросян", "Григорян",
)  # fmt: skip
LATIN_MALE = ("Ivan", "Alexey", "Dmitry", "Sergey", "Andrey", "Maxim", "John", "Michael", "David",
              "Thomas", "Daniel", "Lukas", "Jonas", "Aziz", "Timur", "Arman", "Giorgi", "Aram")  # fmt: skip
LATIN_FEMALE = ("Anna", "Maria", "Elena", "Olga", "Natalia", "Irina", "Emily", "Sarah", "Laura",
                "Sophie", "Hannah", "Julia", "Aigerim", "Nino", "Ani", "Dilnoza", "Kate", "Eva")  # fmt: skip
LATIN_SURNAMES = ("Ivanov", "Petrov", "Smirnov", "Kuznetsov", "Popov", "Sokolov", "Smith", "Brown",
                  "Taylor", "Wilson", "Müller", "Schmidt", "Schneider", "Fischer", "Nurlanov",
                  "Beridze", "Hakobyan", "Karimov", "Abenov", "Lee", "Novak", "García")  # fmt: skip

CATEGORIES = ("Одежда", "Обувь", "Электроника", "Дом и сад", "Красота", "Детские товары",
              "Спорт", "Продукты", "Книги", "Зоотовары")  # fmt: skip
CATEGORY_WEIGHTS = (0.22, 0.12, 0.12, 0.11, 0.1, 0.09, 0.07, 0.08, 0.05, 0.04)

SENDER = "SHOPMARKET"
SHOP_URL = "https://shop.example.ru"
# Who fetches a link without a person behind it: messaging apps drawing a preview (iMessage
# sends Facebook's and Twitter's names), VK's share preview, a search crawler.
PREFETCH_AGENTS = (
    "WhatsApp/2.24.25.78 A",
    "TelegramBot (like TwitterBot)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_11_1) AppleWebKit/601.2.4 (KHTML, like Gecko) Version/9.0.1"
    " Safari/601.2.4 facebookexternalhit/1.1 Facebot Twitterbot/1.0",
    "Viber/22.8.0",
    "Mozilla/5.0 (compatible; vkShare; +http://vk.com/dev/Share)",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
)
PREFETCH_SHARE = 0.04
"""Share of delivered messages with a link that a preview or scanner fetches."""

GAPS = {
    "no_name": 0.015,  # neither first nor last name: a number typed in at the till
    "no_first_name": 0.015,  # a last name only
    "no_gender": 0.03,
    "no_external_id": 0.01,  # added by hand in the shop, never in the CRM
    "email": 0.62,  # share of contacts *with* an email
    "no_category": 0.03,  # orders from the old till, without a category
    "no_consent_text": 0.3,  # opt-ins by API whose caller sent no wording
    "no_proof": 0.5,  # opt-outs from the provider's STOP list, which sends no proof
    "no_agent": 0.02,  # people's clicks without a user agent
    "old_clicks": 0.5,  # clicks older than OLD_CLICK_DAYS recorded neither agent nor method
    "unlinked_replies": 0.002,  # replies per contact the provider tied to no message
    "unknown_senders": 0.001,  # replies per contact from numbers not in the base
}
"""Share of rows with a value missing, by what is missing (besides the gaps the generator has
always made: last names, birth dates, cities, attributes, invalid and empty numbers)."""
OLD_CLICK_DAYS = 60
EMAIL_DOMAINS = ("mail.ru", "yandex.ru", "gmail.com", "bk.ru", "inbox.ru", "list.ru")
UNLINKED_REPLIES = ("Спасибо", "Когда привезут заказ?", "Можно поменять размер?", "Ок, понял")
UNKNOWN_SENDER_REPLIES = ("Кто это?", "Вы кто?", "Здравствуйте, это магазин?", "?")

# A foreign number per country: a valid national pattern with random tail digits.
FOREIGN = {
    "KZ": ("+7 701 {a:03d} {b:02d} {c:02d}", "+7 (701) {a:03d}-{b:02d}-{c:02d}"),
    "BY": ("+375 29 {a:03d}-{b:02d}-{c:02d}", "+375291{a:03d}{b:02d}{c:01d}"),
    "UZ": ("+998 90 {a:03d} {b:02d} {c:02d}", "+998 (90) {a:03d}-{b:02d}-{c:02d}"),
    "AM": ("+374 91 {a:03d} {b:03d}", "+374 91{a:03d}{b:03d}"),
    "GE": ("+995 555 {a:02d} {b:02d} {c:02d}", "+995555{a:02d}{b:02d}{c:02d}"),
    "DE": ("+49 151 {a:04d} {b:04d}", "+49 (0)151 {a:04d}{b:04d}"),
    "GB": ("+44 7400 {a:06d}", "+44 (0) 7800 {a:06d}"),
    "US": ("+1 (415) 5{a:02d}-{b:04d}", "+1 415 5{a:02d} {b:04d}"),
}
LANDLINE_CODES = (495, 499, 812, 383, 343, 843, 831, 391, 351, 846, 347, 863, 861, 381)
INVALID_FORMS = (
    "912-34-{a:02d}", "8 (912) 345-{a:02d}", "+7 (000) 000-00-{a:02d}", "нет", "-", "0",
    "8 800 ЗВОНИ", "7{a:02d}", "+7 912 345 67 89 12 {a:02d}", "тел. уточнить",
)  # fmt: skip


_PLACEHOLDER = re.compile(r"\{([abc]):0(\d)d\}")


def _fill_digits(fmt: str, values) -> str:
    """Fill ``{a:03d}``-style placeholders with exactly that many digits of ``values``."""
    by_name = dict(zip("abc", (int(v) for v in values), strict=True))
    return _PLACEHOLDER.sub(lambda m: f"{by_name[m[1]] % 10 ** int(m[2]):0{m[2]}d}", fmt)


def _ru_formats(n: int, style: int) -> str:
    """One Russian mobile ``9XXXXXXXXX`` as a CRM would hold it."""
    s = f"{n:010d}"
    a, b, c, d = s[:3], s[3:6], s[6:8], s[8:]
    match style:
        case 0:
            return f"8 ({a}) {b}-{c}-{d}"
        case 1:
            return f"+7 {a} {b} {c} {d}"
        case 2:
            return f"7{s}"
        case 3:
            return s
        case 4:
            return f"+7({a}){b}-{c}-{d}"
        case 5:
            return f"8-{a}-{b}-{c}-{d}"
        case 6:
            return f"+7\u00a0{a}\u00a0{b}\u00a0{c}\u00a0{d}"
        case 7:
            return f"8.{a}.{b}.{c}.{d}"
        case _:
            return f"+7{s}"


RU_STYLE_WEIGHTS = (0.24, 0.18, 0.16, 0.08, 0.1, 0.06, 0.04, 0.02, 0.12)


def _feminine(surname: str) -> str:
    for ending, replacement in (("ский", "ская"), ("цкий", "цкая"), ("ой", "ая")):
        if surname.endswith(ending):
            return surname[: -len(ending)] + replacement
    if surname.endswith(("ов", "ев", "ёв", "ин", "ын")):
        return surname + "а"
    if surname.endswith(("ov", "ev", "in")):
        return surname + "a"
    return surname


# ---------------------------------------------------------------------------------------
# Helpers over numpy arrays

SECOND = np.timedelta64(1, "s")


def _ts(values: np.ndarray) -> list[str | None]:
    """datetime64[s] → 'YYYY-MM-DD HH:MM:SS' text (NaT → None)."""
    if len(values) == 0:
        return []
    text = np.datetime_as_string(values.astype("datetime64[s]"), unit="s")
    out = np.char.replace(text, "T", " ").astype(object)
    out[np.isnat(values)] = None
    return out.tolist()


def _ts_col(values: np.ndarray) -> pa.Array:
    """Like ``_ts`` for a whole column, formatted in Arrow (C++), not one Python string at a time."""
    import pyarrow.compute as pc

    return pc.strftime(pa.array(values.astype("datetime64[s]")), format="%Y-%m-%d %H:%M:%S")


def _keys(prefix: str, ids: np.ndarray, width: int = 0) -> pa.Array:
    """``f"{prefix}{i:0{width}d}"`` for each id, computed in Arrow."""
    import pyarrow.compute as pc

    text = pc.cast(pa.array(ids), pa.string())
    if width:
        text = pc.utf8_lpad(text, width=width, padding="0")
    return pc.binary_join_element_wise(pa.scalar(prefix), text, "")


def _idempotency_keys(campaign_ids: np.ndarray, contact_ids: np.ndarray) -> pa.Array:
    """``"<campaign_id>:<contact_id>"``, the outbox's key, computed in Arrow."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(
        pc.cast(pa.array(campaign_ids), pa.string()), pc.cast(pa.array(contact_ids), pa.string()), ":"
    )


def _column(values, kind: pa.DataType) -> pa.Array:
    """One table column as Arrow: lists, numpy arrays and Arrow arrays are all accepted."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values if values.type == kind else values.cast(kind)
    return pa.array(values, type=kind)


@functools.cache
def _login(name: str) -> str:
    """A name as the local part of an email address: Latin letters, lower case."""
    text = unicodedata.normalize("NFKD", encoding.transliterate(name)).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _emails(
    rng: np.random.Generator, ids: np.ndarray, first: np.ndarray, last: np.ndarray
) -> list[str | None]:
    """An email for a share ``GAPS["email"]`` of the contacts, made of their names when known."""
    n = len(ids)
    has = (rng.random(n) < GAPS["email"]).tolist()
    domain = rng.integers(0, len(EMAIL_DOMAINS), size=n).tolist()
    out: list[str | None] = [None] * n
    for i, (given, family, cid) in enumerate(zip(first.tolist(), last.tolist(), ids.tolist(), strict=True)):
        if not has[i]:
            continue
        local = ".".join(filter(None, (_login(name) for name in (given, family) if name))) or "client"
        out[i] = f"{local}{cid % 100}@{EMAIL_DOMAINS[domain[i]]}"
    return out


def _pick(rng: np.random.Generator, options: Sequence, size: int, p: Sequence[float] | None = None):
    arr = np.empty(len(options), dtype=object)
    arr[:] = list(options)
    if p is not None:
        p = np.asarray(p, dtype=float) / np.sum(p)
    return arr[rng.choice(len(options), size=size, p=p)]


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What a demo run wrote, and how long it took."""

    path: Path
    counts: dict[str, int]
    seconds: float


class DemoError(RuntimeError):
    """The demo cannot be written (for example: the store already holds data)."""


# ---------------------------------------------------------------------------------------
# The generator


class _Demo:
    def __init__(self, contacts: int, seed: int, as_of: datetime) -> None:
        if contacts < 1:
            raise DemoError(f"--contacts must be at least 1, got {contacts}")
        self.n = contacts
        self.rng = np.random.default_rng(seed)
        # link previews draw from a generator of their own, so adding them left every other
        # table as the seed made it before
        self.prefetch_rng = np.random.default_rng([seed, 14])
        # and so do the gaps (GAPS): every value they leave is the one the seed made before
        self.gaps = np.random.default_rng([seed, 15])
        self.as_of = np.datetime64(as_of.replace(tzinfo=None), "s")
        self.tables: dict[str, dict[str, list]] = {}

    # -- contacts ------------------------------------------------------------------------
    def contacts(self) -> None:
        import pyarrow.compute as pc

        rng, n = self.rng, self.n
        ids = np.arange(1, n + 1)
        female = rng.random(n) < 0.56
        latin = rng.random(n) < 0.12

        kind = rng.choice(6, size=n, p=[0.905, 0.03, 0.02, 0.025, 0.015, 0.005])
        # 0 RU mobile, 1 foreign, 2 RU landline, 3 invalid, 4 duplicate of another, 5 empty
        mobiles = 9_000_000_000 + rng.integers(0, 1_000_000_000, size=n)
        styles = rng.choice(len(RU_STYLE_WEIGHTS), size=n, p=RU_STYLE_WEIGHTS)
        foreign_country = _pick(rng, list(FOREIGN), n)
        tails = rng.integers(0, 1_000_000, size=(n, 3))
        donors = rng.integers(0, max(n, 1), size=n)
        raw: list[str | None] = [None] * n
        mob_list, style_list, kind_list = mobiles.tolist(), styles.tolist(), kind.tolist()
        for i in range(n):
            k = kind_list[i]
            if k == 0:
                raw[i] = _ru_formats(mob_list[i], style_list[i])
            elif k == 1:
                fmt = FOREIGN[foreign_country[i]][style_list[i] % 2]
                raw[i] = _fill_digits(fmt, tails[i])
            elif k == 2:
                code = LANDLINE_CODES[mob_list[i] % len(LANDLINE_CODES)]
                s = f"{mob_list[i] % 10_000_000:07d}"
                raw[i] = f"8 ({code}) {s[:3]}-{s[3:5]}-{s[5:]}" if style_list[i] % 2 else f"+7{code}{s}"
            elif k == 3:
                raw[i] = INVALID_FORMS[mob_list[i] % len(INVALID_FORMS)].format(a=tails[i][0] % 100)
            elif k == 4:
                j = int(donors[i])
                raw[i] = _ru_formats(mob_list[j], (style_list[i] + 1) % len(RU_STYLE_WEIGHTS))
            else:
                raw[i] = "" if style_list[i] % 2 else None
        normalized = phones.normalize_many(raw, default_region="RU", processes=2 if n >= 200_000 else None)

        # City: Russians across the country (a few blank), foreigners in their country.
        all_cities = cities()
        ru = [c for c in all_cities if c.country == "RU"]
        ru_idx = rng.choice(len(ru), size=n, p=np.array([c.weight for c in ru]) / sum(c.weight for c in ru))
        by_country = {c.country: c for c in all_cities if c.country != "RU"}
        city, region, tz = [None] * n, [None] * n, [None] * n
        blank_city = (rng.random(n) < 0.05).tolist()
        phone_country = [p.country for p in normalized]
        for i in range(n):
            if blank_city[i]:
                continue
            c = by_country.get(phone_country[i]) if kind_list[i] == 1 else ru[ru_idx[i]]
            if c is not None:
                city[i], region[i], tz[i] = c.city, c.region, c.time_zone

        male_first = _pick(rng, MALE_FIRST, n)
        female_first = _pick(rng, FEMALE_FIRST, n)
        surname = _pick(rng, SURNAMES, n)
        fem_surname = np.vectorize(_feminine, otypes=[object])(surname)
        first = np.where(female, female_first, male_first)
        last = np.where(female, fem_surname, surname)
        lat_first = np.where(female, _pick(rng, LATIN_FEMALE, n), _pick(rng, LATIN_MALE, n))
        lat_last_m = _pick(rng, LATIN_SURNAMES, n)
        lat_last = np.where(female, np.vectorize(_feminine, otypes=[object])(lat_last_m), lat_last_m)
        first = np.where(latin, lat_first, first)
        last = np.where(latin, lat_last, last)
        no_last = rng.random(n) < 0.08  # CRMs often hold a first name only
        last = np.where(no_last, None, last)
        gaps = self.gaps
        no_name = gaps.random(n) < GAPS["no_name"]
        first = np.where(no_name | (gaps.random(n) < GAPS["no_first_name"]), None, first)
        last = np.where(no_name, None, last)
        gender = np.where(female, "f", "m").astype(object)
        gender[gaps.random(n) < GAPS["no_gender"]] = None
        external_id = _keys("CRM-", ids, 7)
        external_id = pc.if_else(
            pa.array(gaps.random(n) < GAPS["no_external_id"]), pa.scalar(None, pa.string()), external_id
        )
        email = _emails(gaps, ids, first, last)

        age_days = (rng.gamma(6.0, 6.5, size=n) + 18) * 365.25
        birth = (self.as_of - (age_days * 86400).astype("timedelta64[s]")).astype("datetime64[D]")
        birth_txt = np.datetime_as_string(birth).astype(object)
        birth_txt[rng.random(n) < 0.2] = None

        created = self.as_of - (rng.beta(1.3, 2.4, size=n) * 3 * 365 * 86400).astype("timedelta64[s]")
        tiers = np.array(
            [None, None, None, json.dumps({"loyalty_tier": "silver"}), json.dumps({"loyalty_tier": "gold"}),
             json.dumps({"loyalty_tier": "basic", "store": "online"})],
            dtype=object,
        )  # fmt: skip
        attributes = tiers[rng.choice(len(tiers), size=n, p=[0.4, 0.2, 0.1, 0.12, 0.05, 0.13])]

        self.created = created
        self.e164 = np.array([p.e164 for p in normalized], dtype=object)
        self.valid = np.array([p.valid for p in normalized])
        self.first_name = first
        self.country = np.array(phone_country, dtype=object)
        created_txt = _ts_col(created)
        self.tables["contacts"] = {
            "contact_id": ids,
            "external_id": external_id,
            "first_name": first,
            "last_name": last,
            "gender": gender,
            "birth_date": birth_txt,
            "email": email,
            "city": city,
            "region": region,
            "time_zone": tz,
            "phone_raw": raw,
            "phone_e164": self.e164,
            "phone_valid": self.valid.astype(int),
            "phone_reason": [p.reason for p in normalized],
            "number_type": [p.number_type for p in normalized],
            "phone_country": phone_country,
            "phone_time_zones": [",".join(p.time_zones) or None for p in normalized],
            "attributes": attributes,
            "created_at": created_txt,
            "updated_at": created_txt,
        }

    # -- consent ledger ------------------------------------------------------------------
    def consents(self) -> None:
        rng, n = self.rng, self.n
        has_phone = np.array([e is not None for e in self.e164])
        rows: dict[str, list] = {k: [] for k in (
            "event_key", "phone_e164", "contact_id", "purpose", "action", "source", "consent_text",
            "proof", "occurred_at", "recorded_at")}  # fmt: skip

        def add(mask, purpose, action, source, text, proof_fmt, when) -> None:
            idx = np.flatnonzero(mask)
            when_txt = _ts(when[idx])
            rows["event_key"] += [f"demo:{purpose}:{action}:{i + 1}" for i in idx.tolist()]
            rows["phone_e164"] += self.e164[idx].tolist()
            rows["contact_id"] += (idx + 1).tolist()
            rows["purpose"] += [purpose] * len(idx)
            rows["action"] += [action] * len(idx)
            rows["source"] += source[idx].tolist() if isinstance(source, np.ndarray) else [source] * len(idx)
            rows["consent_text"] += [text] * len(idx)
            rows["proof"] += [proof_fmt.format(i=i + 1) for i in idx.tolist()]
            rows["occurred_at"] += when_txt
            rows["recorded_at"] += when_txt

        signup = self.created
        add(has_phone & (rng.random(n) < 0.92), "service", "opt_in", "web_form",
            "Согласен получать сервисные SMS о заказах и оплате.",
            '{{"form_url": "' + SHOP_URL + '/checkout", "session": "s{i}"}}', signup)  # fmt: skip
        mkt_source = _pick(rng, ("web_form", "import", "api", "keyword_reply"), n, p=(0.5, 0.25, 0.2, 0.05))
        opt_in_at = signup + (rng.exponential(5 * 86400, size=n)).astype("timedelta64[s]")
        opt_in_at = np.minimum(opt_in_at, self.as_of)
        opted_in = has_phone & (rng.random(n) < 0.68)
        add(opted_in, "marketing", "opt_in", mkt_source,
            "Согласен получать рекламные SMS от SHOPMARKET. Отказ — ответ СТОП.",
            '{{"form_url": "' + SHOP_URL + '/signup", "ip": "198.51.100.{i}", "import_batch": null}}',
            opt_in_at)  # fmt: skip
        # Some opt out again later: by link, by the shop's staff, by the provider's STOP list.
        out = opted_in & (rng.random(n) < 0.035)
        out_at = opt_in_at + ((self.as_of - opt_in_at).astype(float) * rng.random(n)).astype("timedelta64[s]")
        out_source = _pick(rng, ("link", "admin", "provider"), n, p=(0.6, 0.25, 0.15))
        add(out, "marketing", "opt_out", out_source, None, '{{"request": "demo-{i}"}}', out_at)
        # the wording an API caller did not send; the proof a provider's STOP list does not give
        source, action = np.array(rows["source"], dtype=object), np.array(rows["action"], dtype=object)
        draw = self.gaps.random((2, len(source)))
        no_text = (source == "api") & (action == "opt_in") & (draw[0] < GAPS["no_consent_text"])
        no_proof = (source == "provider") & (draw[1] < GAPS["no_proof"])
        for column, missing in (("consent_text", no_text), ("proof", no_proof)):
            for i in np.flatnonzero(missing).tolist():
                rows[column][i] = None
        self.marketing_in = opted_in & ~out
        self.tables["consent_events"] = rows

    # -- orders and events ---------------------------------------------------------------
    def orders(self) -> None:
        rng, n = self.rng, self.n
        buyer = rng.random(n) >= 0.36
        counts = np.where(buyer, 1 + rng.negative_binomial(1.1, 0.32, size=n), 0)
        counts = np.minimum(counts, 60)
        owner = np.repeat(np.arange(n), counts)
        m = len(owner)
        active = rng.random(n) < 0.62
        start = self.created.astype("datetime64[s]").astype(np.int64)
        end_all = self.as_of.astype(np.int64)
        end = np.where(active, end_all, start + ((end_all - start) * rng.random(n)).astype(np.int64))
        when = start[owner] + ((end[owner] - start[owner]) * rng.random(m)).astype(np.int64)
        spend_level = rng.lognormal(0, 0.5, size=n)
        amount = np.round(np.maximum(rng.lognormal(np.log(2100), 0.85, size=m) * spend_level[owner], 99), 2)
        self._orders = {
            "contact": owner,
            "when": when.astype("datetime64[s]"),
            "amount": amount,
            "category": _pick(rng, CATEGORIES, m, CATEGORY_WEIGHTS),
            "status": _pick(rng, ("paid", "cancelled", "refunded"), m, (0.93, 0.04, 0.03)),
        }
        self._orders["category"][self.gaps.random(m) < GAPS["no_category"]] = None

    def customer_events(self) -> None:
        rng, n = self.rng, self.n
        kinds = {"app_open": 0.45, "cart_abandoned": 0.15, "payment_due": 0.05}
        owner = [np.arange(n)]
        types = [np.full(n, "signup", dtype=object)]
        when = [self.created]
        horizon = (self.as_of - self.created).astype(np.int64)
        for kind, rate in kinds.items():
            k = rng.poisson(rate, size=n)
            o = np.repeat(np.arange(n), k)
            owner.append(o)
            types.append(np.full(len(o), kind, dtype=object))
            when.append(self.created[o] + (horizon[o] * rng.random(len(o))).astype("timedelta64[s]"))
        owner_a, types_a, when_a = np.concatenate(owner), np.concatenate(types), np.concatenate(when)
        self._events = {"contact": owner_a, "type": types_a, "when": when_a}
        ids = np.arange(1, len(owner_a) + 1)
        props = np.array([None, '{"platform": "ios"}', '{"platform": "android"}', '{"platform": "web"}'],
                         dtype=object)[rng.choice(4, size=len(owner_a))]  # fmt: skip
        props[types_a == "signup"] = None
        self.tables["customer_events"] = {
            "event_id": ids,
            "event_key": _keys("demo:event:", ids),
            "contact_id": (owner_a + 1),
            "event_type": types_a,
            "occurred_at": _ts_col(when_a),
            "properties": props,
        }

    # -- campaign history ----------------------------------------------------------------
    CAMPAIGNS = (
        # name, kind, days ago, audience share, variants {name: template}, holdout, ctr, cvr
        ("Осенняя распродажа −30%", "promo", 84, 0.16, {
            "A": "{name}, осенняя распродажа: −30% на всё до воскресенья! {link}",
            "B": "{name}, только до воскресенья −30% на всю осеннюю коллекцию 🍂 {link}"}, 0.05, 0.055, 0.10),
        ("Новая коллекция", "promo", 70, 0.12, {
            "A": "{name}, новая коллекция уже в магазине. Смотрите первыми: {link}"}, 0.0, 0.045, 0.08),
        ("Вернитесь — 500 ₽ в подарок", "promo", 56, 0.08, {
            "A": "{name}, мы скучаем! Дарим 500 ₽ на следующий заказ от 2000 ₽ по промокоду BACK500: {link}"},
            0.05, 0.04, 0.07),
        ("Weekend sale", "promo", 42, 0.05, {
            "A": "{name}, weekend sale: 20% off everything until Sunday. {link}"}, 0.0, 0.05, 0.09),
        ("Бонусы сгорают", "promo", 28, 0.14, {
            "A": "{name}, у вас 700 бонусов, они сгорят через 3 дня. Потратьте: {link}",
            "B": "{name}, 700 бонусов сгорят через 3 дня! Успейте потратить: {link}"}, 0.05, 0.06, 0.11),
        ("Персональная подборка", "promo", 9, 0.12, {
            "A": "{name}, мы собрали подборку для вас. Скидка 15% до пятницы: {link}",
            "B": "{name}, ваша подборка готова — и −15% на неё до пятницы: {link}"}, 0.05, 0.065, 0.1),
        ("Чёрная пятница: ранний доступ", "promo", 2, 0.15, {
            "A": "{name}, ранний доступ к Чёрной пятнице открыт: до −50%! {link}"}, 0.05, 0.07, 0.12),
    )  # fmt: skip
    UNSIGNED = "Weekend sale"
    """Sent under the provider's default sender: no sender id stored."""
    POLICY = json.dumps({"quiet": "21:00-09:00", "per_day": 1, "per_week": 3})
    STORED_POLICY_DAYS = 28
    """Campaigns launched this many days ago or later stored their quiet hours and caps …"""
    SCHEDULED_DAYS = 9
    """… and these were scheduled to start at their launch."""
    AUTOMATIONS = (
        ("Код подтверждения регистрации", "signup", "Код для входа в SHOPMARKET: {code}. Никому его не сообщайте."),
        ("Напоминание об оплате", "payment_due",
         "{name}, напоминаем об оплате заказа до завтра. Оплатить: {link}"),
        ("Заказ передан в доставку", "order", "{name}, заказ передан в доставку. Отследить: {link}"),
    )  # fmt: skip

    def campaigns(self) -> None:
        rng, n = self.rng, self.n
        prices = sms_prices()
        country_price = np.array(
            [prices.get(c or "ZZ", prices["ZZ"])[1] for c in self.country.tolist()], dtype=float
        )
        analysis_cache: dict[str, tuple[str, int]] = {}

        def analyse(body: str) -> tuple[str, int]:
            hit = analysis_cache.get(body)
            if hit is None:
                a = encoding.analyze(body)
                hit = analysis_cache[body] = (a.encoding, a.segments)
            return hit

        camp_rows: dict[str, list] = {k: [] for k in (
            "campaign_id", "name", "kind", "status", "sender_id", "segment", "trigger_event",
            "test_fraction", "holdout_fraction", "created_at", "launched_at", "finished_at", "policy",
            "scheduled_at")}  # fmt: skip
        var_rows: dict[str, list] = {k: [] for k in ("campaign_id", "variant", "template", "sender_id")}
        batches: list[dict[str, np.ndarray]] = []
        dup_e164 = self.e164

        def plan(cid, kind, contacts, variant, touch, template, holdout_mask):
            """Outbox rows for one campaign: policy outcome, body, price, provider fate."""
            m = len(contacts)
            state = np.full(m, "submitted", dtype=object)
            reason = np.full(m, None, dtype=object)
            e164 = dup_e164[contacts]
            no_phone = ~self.valid[contacts]
            reason[no_phone] = "invalid_number"
            if kind == "promo":
                reason[~no_phone & ~self.marketing_in[contacts]] = "no_consent"
            # the same number twice in one audience (duplicated CRM records)
            _, first_idx = np.unique(np.where(e164 == None, np.arange(m).astype(str), e164).astype(str),  # noqa: E711
                                     return_index=True)  # fmt: skip
            dup = np.ones(m, dtype=bool)
            dup[first_idx] = False
            reason[(reason == None) & dup] = "duplicate"  # noqa: E711
            reason[(reason == None) & (rng.random(m) < (0.012 if kind == "promo" else 0))] = "capped"  # noqa: E711
            state[reason != None] = "suppressed"  # noqa: E711
            state[holdout_mask] = "holdout"
            reason[holdout_mask] = "holdout"
            sending = state == "submitted"
            rejected = sending & (rng.random(m) < 0.006)
            state[rejected] = "rejected"
            error = np.full(m, None, dtype=object)
            error[rejected] = _pick(rng, ("21211", "21610", "21614"), int(rejected.sum()), (0.5, 0.3, 0.2))
            reason[rejected] = np.where(error[rejected] == "21610", "provider_opted_out", "provider_rejected")
            names = self.first_name[contacts]
            bodies = np.full(m, None, dtype=object)
            enc = np.full(m, None, dtype=object)
            segs = np.full(m, None, dtype=object)
            price = np.full(m, None, dtype=object)
            cur = np.full(m, None, dtype=object)
            tokens = np.full(m, None, dtype=object)
            raw_tokens = rng.integers(0, 2**62, size=m)
            # an invalid number is suppressed before rendering (as the planner does): no text, no link
            for i in np.flatnonzero((state != "holdout") & (reason != "invalid_number")).tolist():
                token = f"{raw_tokens[i]:x}"[:10] + f"{i:x}"
                body = template.format(
                    name=names[i] or "клиент",
                    link=f"https://s.example.ru/l/{token}",
                    code=f"{raw_tokens[i] % 1000000:06d}",
                )
                bodies[i] = body
                enc[i], segs[i] = analyse(body)
                if "{link}" in template:
                    tokens[i] = token
            billable = (state == "submitted") | (state == "rejected")
            price[billable] = np.round(
                np.array(segs[billable], dtype=float) * country_price[contacts][billable], 4
            )
            cur[billable] = "RUB"
            batches.append({
                "campaign_id": np.full(m, cid), "variant": np.full(m, variant, dtype=object),
                "contact": contacts, "e164": e164, "body": bodies, "encoding": enc, "segments": segs,
                "price": price, "currency": cur, "state": state, "reason": reason, "error": error,
                "planned": touch, "token": tokens,
            })  # fmt: skip

        cid = 0
        for name, kind, days_ago, share, variants, holdout, ctr, cvr in self.CAMPAIGNS:
            cid += 1
            sender = None if name == self.UNSIGNED else SENDER
            launched = self.as_of - np.timedelta64(days_ago, "D") + np.timedelta64(8, "h")
            # Marketers target mostly opted-in contacts; the rest shows what policy removes.
            size = max(1, int(n * share))
            pool_in = np.flatnonzero(self.marketing_in & (self.created < launched))
            pool_any = np.flatnonzero(self.created < launched)
            k_in = min(len(pool_in), int(size * 0.88))
            audience = np.concatenate([
                rng.choice(pool_in, size=k_in, replace=False) if k_in else np.array([], dtype=int),
                rng.choice(pool_any, size=min(len(pool_any), size - k_in), replace=False),
            ])  # fmt: skip
            audience = np.unique(audience)
            rng.shuffle(audience)
            m = len(audience)
            hold = rng.random(m) < holdout
            names_v = list(variants)
            assign = rng.integers(0, len(names_v), size=m)
            touch = launched + (np.arange(m) // 400).astype("timedelta64[s]")  # ~400 msg/s
            for vi, vname in enumerate(names_v):
                sel = (assign == vi) & ~hold
                plan(cid, kind, audience[sel], vname, touch[sel], variants[vname], np.zeros(sel.sum(), bool))
                var_rows["campaign_id"].append(cid)
                var_rows["variant"].append(vname)
                var_rows["sender_id"].append(sender)
                var_rows["template"].append(
                    variants[vname]
                    .replace("{name}", "{{ first_name | default('клиент') }}")
                    .replace("{link}", "{{ link('" + SHOP_URL + "/sale') }}")
                )
            if hold.any():
                plan(cid, kind, audience[hold], "holdout", touch[hold], "", hold[hold])
            finished = touch.max() + np.timedelta64(2, "h")
            camp_rows["campaign_id"].append(cid)
            camp_rows["name"].append(name)
            camp_rows["kind"].append(kind)
            camp_rows["status"].append("finished")
            camp_rows["sender_id"].append(sender)
            camp_rows["segment"].append(
                json.dumps({"all": [{"field": "is_reachable_marketing", "op": "is_true"}]})
            )
            camp_rows["trigger_event"].append(None)
            camp_rows["test_fraction"].append(1.0 if len(variants) > 1 else None)
            camp_rows["holdout_fraction"].append(holdout or None)
            camp_rows["created_at"].append(_ts(np.array([launched - np.timedelta64(1, "D")]))[0])
            camp_rows["launched_at"].append(_ts(np.array([launched]))[0])
            camp_rows["finished_at"].append(_ts(np.array([finished]))[0])
            # the older campaigns predate stored policies and schedules
            camp_rows["policy"].append(self.POLICY if days_ago <= self.STORED_POLICY_DAYS else None)
            scheduled = days_ago <= self.SCHEDULED_DAYS
            camp_rows["scheduled_at"].append(camp_rows["launched_at"][-1] if scheduled else None)
            self._campaign_rates[cid] = (ctr, cvr)

        # Event-triggered service messages over the last 90 days.
        window_start = self.as_of - np.timedelta64(90, "D")
        for name, trigger, template in self.AUTOMATIONS:
            cid += 1
            if trigger == "order":
                when = self._orders["when"]
                sel = (when >= window_start) & (rng.random(len(when)) < 0.5)
                contacts, touch = self._orders["contact"][sel], when[sel] + np.timedelta64(20, "h")
            else:
                ev = self._events
                sel = (ev["type"] == trigger) & (ev["when"] >= window_start)
                contacts, touch = ev["contact"][sel], ev["when"][sel] + np.timedelta64(3, "s")
            keep = touch <= self.as_of
            contacts, touch = contacts[keep], touch[keep]
            # a contact gets one message per trigger occurrence; the outbox key is per
            # campaign x contact, so keep the latest occurrence
            order = np.argsort(touch)
            contacts, touch = contacts[order], touch[order]
            _, last_idx = np.unique(contacts[::-1], return_index=True)
            last_idx = len(contacts) - 1 - last_idx
            contacts, touch = contacts[last_idx], touch[last_idx]
            plan(cid, "service", contacts, "A", touch, template, np.zeros(len(contacts), dtype=bool))
            var_rows["campaign_id"].append(cid)
            var_rows["variant"].append("A")
            var_rows["template"].append(
                template.replace("{name}", "{{ first_name | default('клиент') }}")
                .replace("{link}", "{{ link('" + SHOP_URL + "/orders') }}")
                .replace("{code}", "{{ code }}")
            )
            var_rows["sender_id"].append(SENDER)
            first_touch = touch.min() if len(touch) else window_start
            camp_rows["campaign_id"].append(cid)
            camp_rows["name"].append(name)
            camp_rows["kind"].append("service")
            camp_rows["status"].append("running")
            camp_rows["sender_id"].append(SENDER)
            camp_rows["segment"].append(None)
            camp_rows["trigger_event"].append(trigger if trigger != "order" else "order_shipped")
            camp_rows["test_fraction"].append(None)
            camp_rows["holdout_fraction"].append(None)
            camp_rows["created_at"].append(_ts(np.array([window_start]))[0])
            camp_rows["launched_at"].append(_ts(np.array([first_touch]))[0])
            camp_rows["finished_at"].append(None)
            camp_rows["policy"].append(None)
            camp_rows["scheduled_at"].append(None)
            self._campaign_rates[cid] = (0.25 if "{link}" in template else 0.0, 0.0)
        self.tables["campaigns"] = camp_rows
        self.tables["campaign_variants"] = var_rows
        self._outbox = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def outcomes(self) -> None:
        """Receipts, links, clicks, replies and the orders that follow messages."""
        rng = self.rng
        ob = self._outbox
        m = len(ob["contact"])
        ids = np.arange(1, m + 1)
        planned = ob["planned"].astype("datetime64[s]")
        state = ob["state"]
        submitted = state == "submitted"
        submitted_at = np.where(submitted | (state == "rejected"), planned + np.timedelta64(1, "s"),
                                np.datetime64("NaT"))  # fmt: skip
        provider_id = np.full(m, None, dtype=object)
        provider_id[submitted] = [f"SM{i:032x}" for i in ids[submitted].tolist()]
        cids = ob["campaign_id"]
        self._emit(
            "messages",
            {
                "message_id": ids,
                "idempotency_key": _idempotency_keys(cids, ob["contact"] + 1),
                "campaign_id": cids,
                "variant": ob["variant"],
                "contact_id": (ob["contact"] + 1),
                "phone_e164": ob["e164"],
                "body": ob["body"],
                "encoding": ob["encoding"],
                "segments": ob["segments"],
                "price": ob["price"],
                "currency": ob["currency"],
                "state": state,
                "skip_reason": ob["reason"],
                "error_code": ob["error"],
                "provider": np.where(submitted | (state == "rejected"), "sandbox", None),
                "provider_message_id": provider_id,
                "planned_at": _ts_col(planned),
                "not_before": [None] * m,
                "submitted_at": _ts_col(submitted_at),
                "attempts": (submitted | (state == "rejected")).astype(int),
            },
        )

        # receipts: sent (mostly), then a terminal status; a few arrive out of order
        fate = rng.choice(3, size=m, p=[0.93, 0.04, 0.03])  # delivered / undelivered / failed
        sent_lag = rng.exponential(3, size=m).astype("timedelta64[s]") + np.timedelta64(1, "s")
        final_lag = sent_lag + rng.exponential(25, size=m).astype("timedelta64[s]") + np.timedelta64(1, "s")
        pending = submitted & (planned + final_lag > self.as_of)  # too recent for a receipt
        has_sent = submitted & (rng.random(m) < 0.97)
        has_final = submitted & ~pending
        delivered = has_final & (fate == 0)
        ev_msg = np.concatenate([ids[has_sent], ids[has_final]])
        ev_status = np.concatenate([
            np.full(int(has_sent.sum()), "sent", dtype=object),
            np.array(["delivered", "undelivered", "failed"], dtype=object)[fate[has_final]],
        ])  # fmt: skip
        ev_occurred = np.concatenate(
            [planned[has_sent] + sent_lag[has_sent], planned[has_final] + final_lag[has_final]]
        )
        ev_received = ev_occurred + rng.exponential(2, size=len(ev_msg)).astype("timedelta64[s]")
        swap = rng.random(len(ev_msg)) < 0.02  # the final receipt overtakes 'sent'
        ev_received = np.where(swap, ev_received + np.timedelta64(90, "s"), ev_received)
        ev_error = np.full(len(ev_msg), None, dtype=object)
        failed_rows = np.isin(ev_status, ["undelivered", "failed"])
        ev_error[failed_rows] = _pick(rng, ("30003", "30005", "30006", "30007", "30008"), int(failed_rows.sum()),
                                      (0.35, 0.2, 0.15, 0.1, 0.2))  # fmt: skip
        order = np.argsort(ev_received, kind="stable")
        self._emit(
            "message_status_events",
            {
                "event_id": np.arange(1, len(ev_msg) + 1),
                "message_id": ev_msg[order],
                "provider": ["sandbox"] * len(ev_msg),
                "provider_message_id": [f"SM{i:032x}" for i in ev_msg[order].tolist()],
                "status": ev_status[order],
                "error_code": ev_error[order],
                "occurred_at": _ts_col(ev_occurred[order]),
                "received_at": _ts_col(ev_received[order]),
            },
        )

        # links and clicks
        delivered_at = planned + final_lag
        has_link = ob["token"] != None  # noqa: E711
        ctr = np.array([self._campaign_rates[c][0] for c in range(1, max(self._campaign_rates) + 1)])[
            cids - 1
        ]
        ctr = ctr * np.where(ob["variant"] == "B", 1.25, 1.0)
        clicked = delivered & has_link & (rng.random(m) < ctr)
        click_at = delivered_at + rng.exponential(5400, size=m).astype("timedelta64[s]")
        clicked &= click_at <= self.as_of
        twice = clicked & (rng.random(m) < 0.12)
        click_msg = np.concatenate([ids[clicked], ids[twice]])
        click_when = np.concatenate([click_at[clicked], click_at[twice] + np.timedelta64(600, "s")])
        agents = _pick(rng, (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
            "Mozilla/5.0 (Linux; Android 15; SM-S921B) AppleWebKit/537.36 Chrome/131.0 Mobile Safari/537.36",
            "Mozilla/5.0 (Linux; Android 14; Redmi Note 13) AppleWebKit/537.36 Chrome/130.0 Mobile Safari/537.36",
        ), len(click_msg))  # fmt: skip
        # link previews and scanners: a few links are fetched 1-5 s after delivery, by a HEAD
        # or by a GET that names its fetcher; recorded as clicks, not people's (the warehouse
        # tells them apart: stg_ops__clicks.is_prefetch)
        pre = self.prefetch_rng
        pre_at = delivered_at + pre.integers(1, 6, size=m).astype("timedelta64[s]")
        previewed = delivered & has_link & (pre.random(m) < PREFETCH_SHARE) & (pre_at <= self.as_of)
        previewed &= ~(clicked & (click_at == pre_at))  # one request per link and second
        pre_msg = ids[previewed]
        pre_agents = _pick(pre, PREFETCH_AGENTS, len(pre_msg))
        pre_method = np.where(pre.random(len(pre_msg)) < 0.4, "HEAD", "GET")
        # people's clicks without a user agent; the older ones recorded neither agent nor method
        # (the redirect kept them only later): all GETs, as the warehouse reads them
        method = np.full(len(click_msg), "GET", dtype=object)
        draw = self.gaps.random((2, len(click_msg)))
        old = click_when < self.as_of - np.timedelta64(OLD_CLICK_DAYS, "D")
        bare = old & (draw[1] < GAPS["old_clicks"])
        agents[(draw[0] < GAPS["no_agent"]) | bare] = None
        method[bare] = None
        all_msg = np.concatenate([click_msg, pre_msg])
        self._emit(
            "links",
            {
                "token": ob["token"][has_link],
                "message_id": ids[has_link],
                "url": [
                    SHOP_URL + "/sale?utm_source=sms&utm_campaign=" + str(c) for c in cids[has_link].tolist()
                ],
                "created_at": _ts_col(planned[has_link]),
            },
        )
        self._emit(
            "clicks",
            {
                "click_id": np.arange(1, len(all_msg) + 1),
                "token": ob["token"][all_msg - 1],
                "message_id": all_msg,
                "clicked_at": _ts_col(np.concatenate([click_when, pre_at[previewed]])),
                "user_agent": np.concatenate([agents, pre_agents]),
                "method": np.concatenate([method, pre_method]),
            },
        )

        # replies: a few STOP (which opt the number out everywhere), the rest free text
        promo = np.array([k == "promo" for k in self.tables["campaigns"]["kind"]])[cids - 1]
        replied = delivered & promo & (rng.random(m) < 0.008)
        reply_at = delivered_at + rng.exponential(3600, size=m).astype("timedelta64[s]")
        replied &= reply_at <= self.as_of
        r_idx = np.flatnonzero(replied)
        texts = _pick(rng, ("СТОП", "Стоп", "STOP", "стоп ", "Отписаться", "Спасибо!", "Когда будет доставка?",
                            "А на детские товары скидка есть?", "не пишите мне больше", "Ок"),
                      len(r_idx), (0.2, 0.08, 0.05, 0.04, 0.03, 0.2, 0.15, 0.12, 0.05, 0.08))  # fmt: skip
        keyword = np.array([_keyword(t) for t in texts.tolist()], dtype=object)
        inbound_ids = np.arange(1, len(r_idx) + 1)
        stray = self.stray_replies()
        every_id = np.arange(1, len(r_idx) + len(stray["body"]) + 1)
        self._emit(
            "inbound_messages",
            {
                "inbound_id": every_id,
                "provider": ["sandbox"] * len(every_id),
                "provider_message_id": [f"SMIN{i:030x}" for i in every_id.tolist()],
                "from_e164": [*ob["e164"][r_idx].tolist(), *stray["from"]],
                "to_number": [SENDER] * len(r_idx) + stray["to"],
                "body": [*texts.tolist(), *stray["body"]],
                "keyword": [*keyword.tolist(), *map(_keyword, stray["body"])],
                "contact_id": [*(ob["contact"][r_idx] + 1).tolist(), *stray["contact"]],
                "in_reply_to": [*ids[r_idx].tolist(), *[None] * len(stray["body"])],
                "received_at": _ts_col(np.concatenate([reply_at[r_idx], stray["at"]])),
            },
        )
        stops = keyword == "stop"
        ce: dict[str, list] = {k: [] for k in (
            "event_key", "phone_e164", "contact_id", "purpose", "action", "source", "consent_text",
            "proof", "occurred_at", "recorded_at")}  # fmt: skip
        self.tables["consent_events"] = ce  # appended after the base ledger
        for inbound_id, phone, contact, when in zip(
            inbound_ids[stops].tolist(), ob["e164"][r_idx][stops].tolist(),
            (ob["contact"][r_idx][stops] + 1).tolist(), _ts(reply_at[r_idx][stops]), strict=True,
        ):  # fmt: skip
            ce["event_key"].append(f"inbound:{inbound_id}")
            ce["phone_e164"].append(phone)
            ce["contact_id"].append(contact)
            ce["purpose"].append("marketing")
            ce["action"].append("opt_out")
            ce["source"].append("keyword_reply")
            ce["consent_text"].append(None)
            ce["proof"].append(json.dumps({"inbound_id": inbound_id}))
            ce["occurred_at"].append(when)
            ce["recorded_at"].append(when)

        # orders that follow a click or a delivery (and a baseline for the holdout)
        cvr = np.array([self._campaign_rates[c][1] for c in range(1, max(self._campaign_rates) + 1)])[
            cids - 1
        ]
        after_click = clicked & (rng.random(m) < cvr * 1.6)
        after_delivery = delivered & ~clicked & promo & (rng.random(m) < cvr * 0.12)
        holdout = state == "holdout"
        baseline = holdout & (rng.random(m) < cvr * 0.06)
        conv = after_click | after_delivery | baseline
        touch = np.where(after_click, click_at, np.where(holdout, planned, delivered_at))
        conv_at = touch + rng.exponential(30 * 3600, size=m).astype("timedelta64[s]")
        conv &= conv_at <= self.as_of
        c_idx = np.flatnonzero(conv)
        self._conversions = {
            "contact": ob["contact"][c_idx],
            "when": conv_at[c_idx],
            "amount": np.round(rng.lognormal(np.log(2600), 0.7, len(c_idx)), 2),
            "category": _pick(rng, CATEGORIES, len(c_idx), CATEGORY_WEIGHTS),
            "status": np.full(len(c_idx), "paid", dtype=object),
        }
        self._conversions["category"][self.gaps.random(len(c_idx)) < GAPS["no_category"]] = None

    def stray_replies(self) -> dict[str, list]:
        """Inbound messages no campaign message answers, over the last 90 days: replies the
        provider tied to no message (from contacts with a valid number), then messages from
        numbers not in the base (no contact, and the provider named no receiving number). None
        is a keyword, so the consent ledger stays as it is."""
        gaps, n = self.gaps, self.n
        valid = np.flatnonzero(self.valid)
        k = min(len(valid), max(1, round(n * GAPS["unlinked_replies"])))
        who = np.sort(gaps.choice(valid, size=k, replace=False)) if k else np.array([], dtype=int)
        start = np.maximum(self.created[who], self.as_of - np.timedelta64(90, "D"))
        linked_at = start + ((self.as_of - start).astype(float) * gaps.random(k)).astype("timedelta64[s]")
        u = max(1, round(n * GAPS["unknown_senders"]))
        unknown_at = self.as_of - (gaps.random(u) * 90 * 86400).astype("timedelta64[s]")
        return {
            "from": [
                *self.e164[who].tolist(),
                *(f"+79{v:09d}" for v in gaps.integers(0, 10**9, size=u).tolist()),
            ],
            "to": [SENDER] * k + [None] * u,
            "contact": [*(who + 1).tolist(), *[None] * u],
            "body": [
                *_pick(gaps, UNLINKED_REPLIES, k).tolist(),
                *_pick(gaps, UNKNOWN_SENDER_REPLIES, u).tolist(),
            ],
            "at": np.concatenate([linked_at, unknown_at]),
        }

    def order_rows(self, orders: dict[str, np.ndarray], first_id: int) -> dict[str, list]:
        """Orders as table rows, numbered from ``first_id`` in time order."""
        order = np.argsort(orders["when"], kind="stable")
        ids = np.arange(first_id, first_id + len(order))
        return {
            "order_id": ids,
            "external_id": _keys("ORD-", ids, 8),
            "contact_id": orders["contact"][order] + 1,
            "ordered_at": _ts_col(orders["when"][order]),
            "amount": orders["amount"][order],
            "currency": ["RUB"] * len(order),
            "category": orders["category"][order],
            "status": orders["status"][order],
        }

    def run(self, emit: Callable[[str, dict[str, list]], None]) -> None:
        """Generate every table, handing each to ``emit`` as soon as it is complete so
        that writing overlaps with generating."""
        self._campaign_rates: dict[int, tuple[float, float]] = {}
        self._emit = emit
        self.contacts()
        emit("contacts", self.tables.pop("contacts"))
        self.consents()
        emit("consent_events", self.tables.pop("consent_events"))
        self.orders()
        emit("orders", self.order_rows(self._orders, first_id=1))
        self.customer_events()
        emit("customer_events", self.tables.pop("customer_events"))
        self.campaigns()
        self.outcomes()
        # orders that followed messages come after the history the campaigns drew on
        self.tables["orders"] = self.order_rows(self._conversions, first_id=len(self._orders["when"]) + 1)
        for table, columns in self.tables.items():
            emit(table, columns)


def _keyword(text: str) -> str | None:
    """Demo-only reply classification; the real one is smsops.consent.classify_reply."""
    word = text.strip().strip("!.").upper()
    if word in {"СТОП", "STOP", "ОТПИСАТЬСЯ"}:
        return "stop"
    return None


class _Writer:
    """Writes tables into a new SQLite file from a background thread.

    Rows go in through ADBC bulk ingest from Arrow, which runs without the GIL, so the
    generator keeps working while earlier tables are written. Journal and fsync are off
    (the file is a temporary that replaces the store only when complete); indexes are
    built at the end, which is faster than maintaining them row by row.
    """

    def __init__(self, path: Path) -> None:
        import adbc_driver_sqlite.dbapi as adbc

        self.path = path
        conn = sqlite3.connect(path)
        try:
            store.create_schema(conn, indexes=False)
            self.declared = {
                table: {
                    name: kind.lower() for _, name, kind, *_ in conn.execute(f"pragma table_info({table})")
                }
                for table in store.TABLES
            }
        finally:
            conn.close()
        self.conn = adbc.connect(str(path), autocommit=True)
        self.cur = self.conn.cursor()
        for sql in ("pragma journal_mode = off", "pragma synchronous = off", "begin"):
            self.cur.execute(sql)
            self.cur.fetchall()
        self.counts = dict.fromkeys(store.TABLES, 0)
        self.pending = dict.fromkeys(store.TABLES, 1)
        self.queue: queue.Queue[tuple[str, dict[str, list]] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="demo-writer", daemon=True)
        self.thread.start()

    def put(self, table: str, columns: dict[str, list]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((table, columns))

    def expect(self, batches: dict[str, int]) -> None:
        """How many batches each table arrives in (default one), so that a table is indexed
        as soon as its last batch is in."""
        self.pending.update(batches)

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            table, columns = item
            try:
                types = self.declared[table]
                data = pa.table(
                    {
                        name: _column(values, store.ARROW_TYPES[types[name]])
                        for name, values in columns.items()
                    }
                )
                if data.num_rows:
                    self.cur.adbc_ingest(table, data, mode="append")
                self.counts[table] += data.num_rows
                self.pending[table] -= 1
                if self.pending[table] == 0:  # the table is complete: index it now
                    for ddl in store.INDEXES:
                        if f" on {table} (" in ddl:
                            self.cur.execute(ddl)
                            self.cur.fetchall()
            except BaseException as exc:
                self.error = exc

    def finish(self) -> dict[str, int]:
        self.queue.put(None)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            self.cur.execute("commit")
            self.cur.fetchall()
        finally:
            self.cur.close()
            self.conn.close()
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            for ddl in store.INDEXES:  # no-ops, but for a table that never arrived
                conn.execute(ddl)
            conn.execute("pragma journal_mode = wal")
        finally:
            conn.close()
        return self.counts

    def abort(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.cur.close()
        self.conn.close()


def generate(
    contacts: int = 20_000,
    seed: int = 42,
    *,
    as_of: datetime | date | None = None,
    home: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> DemoSummary:
    """Write a demo base into the store under ``home``.

    Refuses to touch a store that holds contacts unless ``force``; the new store is
    written beside the old one and swapped in only when complete.
    """
    started = time.perf_counter()
    target = paths(home).ops_store
    if not force and not store.is_empty(home):
        raise DemoError(f"{target} already holds contacts; use --force to replace it with a demo base")
    if as_of is None:
        as_of = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    elif isinstance(as_of, date) and not isinstance(as_of, datetime):
        as_of = datetime(as_of.year, as_of.month, as_of.day)
    generator = _Demo(contacts, seed, as_of)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".demo-tmp")
    tmp.unlink(missing_ok=True)
    try:
        writer = _Writer(tmp)
        try:
            writer.expect({"consent_events": 2, "orders": 2})
            generator.run(writer.put)
        except BaseException:
            writer.abort()
            raise
        counts = writer.finish()
        for suffix in ("-wal", "-shm"):
            Path(str(target) + suffix).unlink(missing_ok=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return DemoSummary(path=target, counts=counts, seconds=time.perf_counter() - started)
