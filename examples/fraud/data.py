"""Seeded synthetic data for the card-transaction fraud demo.

Everything here is a pure function of its arguments (numpy ``default_rng(seed)``), so the demo can generate
the feature-store rows, train the model, stream transactions and re-score every one of them offline, and get
the same numbers each time. The only I/O is in the explicit ``write_*`` helpers.

The pieces:

- two feature views, ``card_stats`` (entity ``card_id``) and ``merchant_stats`` (entity ``merchant_id``),
  whose defaults describe an unknown card or merchant;
- ``generate_feature_rows``: one row per card and merchant, with plausible distributions (lognormal amounts,
  Poisson counts, a few risky merchants, a few cards with chargebacks);
- ``generate_transactions``: transactions against those rows, each with a fraud label drawn from a logistic
  function of the same values the model sees, so the model has real (but noisy) signal;
- ``MODEL_INPUTS`` and ``feature_matrix``: the model's column order and the offline assembly of that matrix,
  which is what the streamed scores are checked against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from streamscore.featurestore.views import Feature, FeatureView, dump_views

FeatureRows = dict[str, dict[str, dict[str, float | int | bool]]]
"""``{view name: {entity id: {feature name: value}}}``, values Python-native."""

Transaction = dict[str, Any]
"""``{"card_id", "merchant_id", "amount", "hour", "is_foreign"[, "label"]}``."""

THIRTY_DAYS_S = 30 * 24 * 3600
N_CARDS = 10_000
N_MERCHANTS = 1_000

# Population means of the generated card and merchant rows (measured over many seeds, rounded): the
# defaults for an entity the store does not know, so an unknown card looks like an average one.
POPULATION_AMOUNT_MEAN = 52.5
POPULATION_AMOUNT_STD = 38.0
POPULATION_MERCHANT_FRAUD_RATE = 0.006
POPULATION_AVG_TICKET = 57.0

CARD_VIEW = "card_stats"
MERCHANT_VIEW = "merchant_stats"


def fraud_views() -> list[FeatureView]:
    """The demo's two feature views, with defaults for a card or merchant the store does not know."""
    card = FeatureView(
        name=CARD_VIEW, entity="card_id", ttl_s=THIRTY_DAYS_S,
        description="rolling statistics of a payment card",
        features=(
            Feature(name="txn_count_24h", type="int", default=0,
                    description="transactions on the card in the last 24 hours"),
            Feature(name="amount_mean_30d", type="float", default=POPULATION_AMOUNT_MEAN,
                    description="mean transaction amount over 30 days (unknown card: population mean)"),
            Feature(name="amount_std_30d", type="float", default=POPULATION_AMOUNT_STD,
                    description="standard deviation of the amount over 30 days (unknown card: population)"),
            Feature(name="chargebacks_90d", type="int", default=0,
                    description="chargebacks filed against the card in the last 90 days"),
            Feature(name="account_age_days", type="int", default=0,
                    description="days since the card account was opened (unknown card: new)"),
            Feature(name="is_prepaid", type="bool", default=0,
                    description="the card is a prepaid card"),
        ),
    )
    merchant = FeatureView(
        name=MERCHANT_VIEW, entity="merchant_id", ttl_s=THIRTY_DAYS_S,
        description="rolling statistics and risk profile of a merchant",
        features=(
            Feature(name="fraud_rate_30d", type="float", default=POPULATION_MERCHANT_FRAUD_RATE,
                    description="share of the merchant's transactions reported as fraud over 30 days"),
            Feature(name="txn_count_24h", type="int", default=0,
                    description="transactions at the merchant in the last 24 hours"),
            Feature(name="risk_category", type="int", default=2,
                    description="acquirer risk category, 0 (lowest) to 4 (highest); unknown: 2"),
            Feature(name="avg_ticket", type="float", default=POPULATION_AVG_TICKET,
                    description="mean transaction amount at the merchant over 30 days"),
            Feature(name="is_online", type="bool", default=0,
                    description="card-not-present (online) merchant"),
        ),
    )
    return [card, merchant]


def write_views(path: Path) -> None:
    """Write the demo's feature views file (the format ``featurestore.views.load_views`` reads)."""
    dump_views(fraud_views(), path)


def card_ids(n: int = N_CARDS) -> list[str]:
    return [f"card-{i}" for i in range(n)]


def merchant_ids(n: int = N_MERCHANTS) -> list[str]:
    return [f"merchant-{i}" for i in range(n)]


# --- feature rows -------------------------------------------------------------------------------------------

def _card_columns(rng: np.random.Generator, n: int) -> dict[str, list[Any]]:
    activity = rng.gamma(shape=1.5, scale=2.0, size=n)  # mean 3 transactions a day
    log_mu = rng.normal(3.5, 0.7, size=n)
    log_sigma = rng.uniform(0.35, 0.9, size=n)
    amount_mean = np.exp(log_mu + log_sigma**2 / 2)
    amount_std = amount_mean * np.sqrt(np.expm1(log_sigma**2))
    is_new = rng.random(n) < 0.10
    account_age = np.where(is_new, rng.integers(0, 60, size=n),
                           60 + np.minimum(rng.exponential(1000.0, size=n), 5000.0).astype(np.int64))
    is_prepaid = rng.random(n) < 0.07
    troubled = rng.random(n) < 0.03  # a few cards with a chargeback history
    chargebacks = rng.poisson(np.where(troubled, 1.5, 0.02))
    return {
        "txn_count_24h": rng.poisson(activity).tolist(),
        "amount_mean_30d": np.round(amount_mean, 2).tolist(),
        "amount_std_30d": np.round(amount_std, 2).tolist(),
        "chargebacks_90d": chargebacks.tolist(),
        "account_age_days": account_age.tolist(),
        "is_prepaid": is_prepaid.tolist(),
    }


def _merchant_columns(rng: np.random.Generator, n: int) -> dict[str, list[Any]]:
    risky = rng.random(n) < 0.04  # a few merchants with a fraud problem
    fraud_rate = np.where(risky, rng.beta(3.0, 40.0, size=n), rng.beta(1.2, 300.0, size=n))
    risk_category = np.where(risky, rng.choice([2, 3, 4], p=[0.2, 0.4, 0.4], size=n),
                             rng.choice([0, 1, 2, 3], p=[0.35, 0.35, 0.2, 0.1], size=n))
    popularity = rng.lognormal(4.0, 1.2, size=n)
    return {
        "fraud_rate_30d": np.round(fraud_rate, 5).tolist(),
        "txn_count_24h": rng.poisson(popularity).tolist(),
        "risk_category": risk_category.tolist(),
        "avg_ticket": np.round(rng.lognormal(3.7, 0.8, size=n), 2).tolist(),
        "is_online": (rng.random(n) < np.where(risky, 0.7, 0.3)).tolist(),
    }


def _rows(ids: list[str], columns: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    names = list(columns)
    return {entity: {name: columns[name][i] for name in names} for i, entity in enumerate(ids)}


def generate_feature_rows(seed: int, n_cards: int = N_CARDS, n_merchants: int = N_MERCHANTS) -> FeatureRows:
    """One row per card and merchant: ``{view: {entity id: {feature: value}}}``, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return {
        CARD_VIEW: _rows(card_ids(n_cards), _card_columns(rng, n_cards)),
        MERCHANT_VIEW: _rows(merchant_ids(n_merchants), _merchant_columns(rng, n_merchants)),
    }


# --- model inputs and the offline feature matrix -------------------------------------------------------------

REQUEST_DEFAULTS: dict[str, float | None] = {"amount": None, "hour": 12.0, "is_foreign": 0.0}
"""Request-time features, in column order, with their defaults (None: required)."""


def _model_inputs() -> list[dict[str, Any]]:
    inputs: list[dict[str, Any]] = [
        {"name": name, "source": "request", "default": default} for name, default in REQUEST_DEFAULTS.items()
    ]
    for view in fraud_views():
        inputs.extend({"name": f"{view.name}.{feature}", "source": "view"} for feature in view.feature_names)
    return inputs


MODEL_INPUTS: list[dict[str, Any]] = _model_inputs()
"""The model's inputs in column order, as manifest input dicts: request features, then view features."""

COLUMNS: list[str] = [spec["name"] for spec in MODEL_INPUTS]
"""Column names of ``feature_matrix``, in order."""


def _request_block(transactions: list[Transaction]) -> np.ndarray:
    def value(txn: Transaction, name: str, default: float | None) -> float:
        if name in txn:
            return float(txn[name])
        if default is None:
            raise ValueError(f"transaction {txn!r} has no {name!r}, which the model requires")
        return default

    return np.array([[value(txn, name, default) for name, default in REQUEST_DEFAULTS.items()]
                     for txn in transactions], dtype=np.float64).reshape(len(transactions), len(REQUEST_DEFAULTS))


def _view_block(view: FeatureView, rows: dict[str, dict[str, Any]], entity_ids: list[str]) -> np.ndarray:
    """The view's features for each entity id, in view order; the view's defaults where the id has no row."""
    names = view.feature_names
    defaults = tuple(view.defaults)
    by_entity = {entity: tuple(float(row[name]) for name in names) for entity, row in rows.items()}
    block = [by_entity.get(entity, defaults) for entity in entity_ids]
    return np.array(block, dtype=np.float64).reshape(len(entity_ids), len(names))


def feature_matrix(transactions: list[Transaction], rows: FeatureRows) -> np.ndarray:
    """The model's float32 input matrix (n x len(MODEL_INPUTS)), assembled offline in ``MODEL_INPUTS`` order.

    An entity absent from ``rows`` gets its view's defaults, as the online store does; bools become 0/1.
    """
    blocks = [_request_block(transactions)]
    for view in fraud_views():
        entity_ids = [str(txn[view.entity]) for txn in transactions]
        blocks.append(_view_block(view, rows.get(view.name, {}), entity_ids))
    return np.hstack(blocks).astype(np.float32)


# --- transactions and their labels ----------------------------------------------------------------------------

# Label model: logit = intercept + sum(weight * term). Tuned so the fraud base rate is about 3%.
_LABEL_INTERCEPT = -5.6
_LABEL_WEIGHTS = {
    "amount_z": 0.55,  # amount in card standard deviations above the card's mean, clipped to [-1, 6]
    "merchant_fraud_rate": 30.0,
    "risk_category": 0.35,
    "chargebacks": 0.8,  # capped at 3
    "is_prepaid": 0.9,
    "is_foreign": 1.3,
    "night": 1.0,  # 0:00 to 5:59
    "new_account": 1.0,  # under 60 days
}


def _label_terms(features: np.ndarray) -> dict[str, np.ndarray]:
    column = {name: features[:, i].astype(np.float64) for i, name in enumerate(COLUMNS)}
    std = np.maximum(column["card_stats.amount_std_30d"], 1.0)
    return {
        "amount_z": np.clip((column["amount"] - column["card_stats.amount_mean_30d"]) / std, -1.0, 6.0),
        "merchant_fraud_rate": column["merchant_stats.fraud_rate_30d"],
        "risk_category": column["merchant_stats.risk_category"],
        "chargebacks": np.minimum(column["card_stats.chargebacks_90d"], 3.0),
        "is_prepaid": column["card_stats.is_prepaid"],
        "is_foreign": column["is_foreign"],
        "night": (column["hour"] < 6.0).astype(np.float64),
        "new_account": (column["card_stats.account_age_days"] < 60.0).astype(np.float64),
    }


def fraud_logit(features: np.ndarray) -> np.ndarray:
    """The true log-odds of fraud behind the labels, from a ``feature_matrix`` (for tests and diagnostics)."""
    terms = _label_terms(features)
    return _LABEL_INTERCEPT + sum((_LABEL_WEIGHTS[name] * term for name, term in terms.items()),
                                  start=np.zeros(features.shape[0]))


def _pick(rng: np.random.Generator, ids: list[str], weights: np.ndarray, n: int) -> list[str]:
    chosen = rng.choice(len(ids), size=n, p=weights / weights.sum())
    return [ids[i] for i in chosen.tolist()]


def _amounts(rng: np.random.Generator, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Mostly the card's usual (lognormal) spending; one in ten an unusual amount, log-uniform 1..5000."""
    n = mean.shape[0]
    log_sigma2 = np.log1p((std / np.maximum(mean, 1.0)) ** 2)
    usual = rng.lognormal(np.log(np.maximum(mean, 1.0)) - log_sigma2 / 2, np.sqrt(log_sigma2))
    unusual = np.exp(rng.uniform(0.0, np.log(5000.0), size=n))
    return np.round(np.where(rng.random(n) < 0.9, usual, unusual), 2).clip(0.5, None)


def _hours(rng: np.random.Generator, n: int) -> np.ndarray:
    """Whole hours 0..23: mostly a daytime peak around 14:00, some uniform over the day."""
    daytime = np.floor(rng.normal(14.0, 4.0, size=n)) % 24
    anytime = rng.integers(0, 24, size=n)
    return np.where(rng.random(n) < 0.85, daytime, anytime).astype(np.float64)


def generate_transactions(rows: FeatureRows, n: int, seed: int, with_labels: bool = True, *,
                          unknown_rate: float = 0.0) -> list[Transaction]:
    """``n`` transactions against the cards and merchants in ``rows``, deterministic in ``seed``.

    Busy cards and merchants (``txn_count_24h``) are picked more often. ``unknown_rate`` is the share of
    transactions whose card and merchant are not in ``rows`` (new ids), which the store answers with defaults.
    The label is drawn from ``fraud_logit`` of the transaction's features; the same random draws are made
    whether or not labels are kept, so ``with_labels`` changes nothing else.
    """
    rng = np.random.default_rng(seed)
    cards, merchants = rows[CARD_VIEW], rows[MERCHANT_VIEW]
    card_list, merchant_list = list(cards), list(merchants)
    chosen_cards = _pick(rng, card_list, np.array([r["txn_count_24h"] + 1.0 for r in cards.values()]), n)
    chosen_merchants = _pick(rng, merchant_list,
                             np.array([r["txn_count_24h"] + 1.0 for r in merchants.values()]), n)
    unknown = (rng.random(n) < unknown_rate).tolist()
    for i in (i for i, is_unknown in enumerate(unknown) if is_unknown):
        chosen_cards[i] = f"card-new-{seed}-{i}"
        chosen_merchants[i] = f"merchant-new-{seed}-{i}"
    card_view, merchant_view = fraud_views()
    card_block = _view_block(card_view, cards, chosen_cards)
    merchant_online = _view_block(merchant_view, merchants, chosen_merchants)[:, -1]
    amounts = _amounts(rng, card_block[:, 1], card_block[:, 2])
    hours = _hours(rng, n)
    foreign = (rng.random(n) < 0.04 + 0.08 * merchant_online).astype(np.float64)
    label_draw = rng.random(n)
    transactions: list[Transaction] = [
        {"card_id": card, "merchant_id": merchant, "amount": amount, "hour": hour, "is_foreign": is_foreign}
        for card, merchant, amount, hour, is_foreign in zip(
            chosen_cards, chosen_merchants, amounts.tolist(), hours.tolist(), foreign.tolist(), strict=True)
    ]
    if with_labels:
        probability = 1.0 / (1.0 + np.exp(-fraud_logit(feature_matrix(transactions, rows))))
        for txn, is_fraud in zip(transactions, (label_draw < probability).tolist(), strict=True):
            txn["label"] = int(is_fraud)
    return transactions


def labels(transactions: list[Transaction]) -> np.ndarray:
    """The 0/1 labels of labelled transactions, as an int64 array."""
    return np.array([txn["label"] for txn in transactions], dtype=np.int64)


# --- a shifted population: the drift demo's new fraud pattern ---------------------------------------------------

SHIFT_TESTING_SHARE = 0.35
"""Share of the shifted traffic that is card testing: tiny amounts (0.5 to 5), mostly foreign, at any hour."""
SHIFT_FOREIGN_RATE = 0.6
"""Share of the card-testing transactions made abroad (the usual traffic: 4%, 12% at online merchants)."""
SHIFT_OTHER_FOREIGN_RATE = 0.15
"""Share of the shifted population's other transactions made abroad."""

# The new label model: a card-testing ring. Fraud is now tiny amounts, above all abroad and at online merchants;
# an amount far above the card's mean, a risky merchant or a chargeback history no longer say fraud (the terms v1
# leans on), and a tiny amount is what v1 trusts most.
_SHIFT_INTERCEPT = -4.6
_SHIFT_WEIGHTS = {
    "small_amount": 2.8,  # amount under 5
    "small_foreign": 1.2,  # a tiny amount abroad
    "is_online": 0.8,
}


def _shifted_terms(features: np.ndarray) -> dict[str, np.ndarray]:
    column = {name: features[:, i].astype(np.float64) for i, name in enumerate(COLUMNS)}
    small = (column["amount"] < 5.0).astype(np.float64)
    return {
        "small_amount": small,
        "small_foreign": small * column["is_foreign"],
        "is_online": column["merchant_stats.is_online"],
    }


def shifted_fraud_logit(features: np.ndarray) -> np.ndarray:
    """The true log-odds of fraud of the shifted population (``generate_shifted_transactions``)."""
    terms = _shifted_terms(features)
    return _SHIFT_INTERCEPT + sum((_SHIFT_WEIGHTS[name] * term for name, term in terms.items()),
                                  start=np.zeros(features.shape[0]))


def generate_shifted_transactions(rows: FeatureRows, n: int, seed: int, with_labels: bool = True, *,
                                  testing_share: float = SHIFT_TESTING_SHARE) -> list[Transaction]:
    """``n`` transactions of a shifted population, deterministic in ``seed``: the cards and merchants of
    ``generate_transactions``, but a share ``testing_share`` of card testing (amounts log-uniform 0.5..5, foreign
    at ``SHIFT_FOREIGN_RATE``, any hour), the others foreign at ``SHIFT_OTHER_FOREIGN_RATE``; the label is drawn
    from ``shifted_fraud_logit``."""
    transactions = generate_transactions(rows, n, seed, with_labels=False)
    rng = np.random.default_rng([seed, 1])
    testing = rng.random(n) < testing_share
    tiny = np.round(np.exp(rng.uniform(np.log(0.5), np.log(5.0), size=n)), 2)
    foreign = rng.random(n) < np.where(testing, SHIFT_FOREIGN_RATE, SHIFT_OTHER_FOREIGN_RATE)
    hours = rng.integers(0, 24, size=n).astype(np.float64)
    label_draw = rng.random(n)
    for i, txn in enumerate(transactions):
        if testing[i]:
            txn["amount"], txn["hour"] = float(tiny[i]), float(hours[i])
        txn["is_foreign"] = float(foreign[i])
    if with_labels:
        probability = 1.0 / (1.0 + np.exp(-shifted_fraud_logit(feature_matrix(transactions, rows))))
        for txn, is_fraud in zip(transactions, (label_draw < probability).tolist(), strict=True):
            txn["label"] = int(is_fraud)
    return transactions
