"""Pricing: list prices, the batch discount, model-id resolution, overrides, estimates."""

from __future__ import annotations

import pytest

from daemon.pricing import (
    LIST_PRICES,
    PriceTable,
    batch_cost,
    estimate_request_tokens,
    estimate_tokens,
    projected_cost,
)
from plugins.errors import ConfigError

MTOK = 1_000_000


class TestListPrices:
    """The built-in table matches Anthropic's published list prices."""

    @pytest.mark.parametrize(
        ("model", "input_price", "output_price"),
        [
            ("claude-opus-4-1", 15.0, 75.0),
            ("claude-opus-4", 15.0, 75.0),
            ("claude-sonnet-4-5", 3.0, 15.0),
            ("claude-sonnet-4", 3.0, 15.0),
            ("claude-haiku-4-5", 1.0, 5.0),
            ("claude-3-5-haiku", 0.80, 4.0),
            ("claude-3-haiku", 0.25, 1.25),
        ],
    )
    def test_input_and_output(self, model: str, input_price: float, output_price: float) -> None:
        """Input and output list prices per million tokens."""
        price = PriceTable().price(model)
        assert (price.input, price.output, price.known) == (input_price, output_price, True)

    @pytest.mark.parametrize("model", ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4"])
    def test_cache_prices_follow_input(self, model: str) -> None:
        """A 5-minute cache write is 1.25x input and a cache read 0.1x input."""
        price = LIST_PRICES[model]
        assert price.cache_write == pytest.approx(price.input * 1.25)
        assert price.cache_read == pytest.approx(price.input * 0.1)


class TestModelResolution:
    """Dated ids and aliases find their base model, and nothing else does."""

    @pytest.mark.parametrize(
        ("model", "expected_output"),
        [
            ("claude-haiku-4-5-20251001", 5.0),
            ("claude-sonnet-4-5-20250929", 15.0),
            ("claude-sonnet-4-20250514", 15.0),
            ("claude-opus-4-1-20250805", 75.0),
            ("claude-opus-4-20250514", 75.0),
            ("claude-3-5-haiku-latest", 4.0),
            ("claude-3-5-haiku-20241022", 4.0),
            ("claude-3-haiku-20240307", 1.25),
            ("claude-sonnet-4-0", 15.0),
            ("claude-sonnet-4-5@20250929", 15.0),
        ],
    )
    def test_dated_ids_and_aliases(self, model: str, expected_output: float) -> None:
        """A date or -latest suffix resolves to the base model's price."""
        price = PriceTable().price(model)
        assert price.known and price.output == expected_output

    def test_longest_base_wins(self) -> None:
        """claude-sonnet-4-5-… is Sonnet 4.5, not Sonnet 4 with a strange suffix."""
        table = PriceTable({"claude-sonnet-4-5": {"output": 99.0}})
        assert table.price("claude-sonnet-4-5-20250929").output == 99.0
        assert table.price("claude-sonnet-4-20250514").output == 15.0

    @pytest.mark.parametrize(
        "model", ["gpt-4o", "claude-sonnet-4-5x", "claude-sonnet-4-9-20990101"]
    )
    def test_unknown_model_gets_most_expensive_price(self, model: str) -> None:
        """An unknown id is priced like Opus (the dearest), flagged as not known."""
        price = PriceTable().price(model)
        assert (price.input, price.output, price.known) == (15.0, 75.0, False)

    def test_unknown_model_reported_once(self) -> None:
        """report_unknown is true only the first time, and never for a known model."""
        table = PriceTable()
        assert [table.report_unknown("claude-9") for _ in range(3)] == [True, False, False]
        assert table.report_unknown("claude-haiku-4-5-20251001") is False


class TestBatchCost:
    """What one result costs at batch price."""

    def test_half_of_list_price(self) -> None:
        """A million input and output tokens on Haiku 4.5 cost $0.50 + $2.50 in a batch."""
        usage = {"input_tokens": MTOK, "output_tokens": MTOK}
        assert batch_cost("claude-haiku-4-5-20251001", usage) == pytest.approx(3.0)

    def test_cache_tokens(self) -> None:
        """Cache writes are 1.25x and cache reads 0.1x input, then halved."""
        usage = {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": MTOK,
            "cache_read_input_tokens": MTOK,
        }
        # Sonnet 4.5: (3.75 + 0.30) / 2
        assert batch_cost("claude-sonnet-4-5", usage) == pytest.approx(2.025)

    def test_one_hour_cache_writes(self) -> None:
        """Tokens written to the 1-hour cache are priced at 2x input instead of 1.25x."""
        usage = {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 2 * MTOK,
            "cache_creation": {
                "ephemeral_5m_input_tokens": MTOK,
                "ephemeral_1h_input_tokens": MTOK,
            },
        }
        # Haiku 4.5: (1.25 + 2.0) / 2
        assert batch_cost("claude-haiku-4-5", usage) == pytest.approx(1.625)

    def test_real_usage_block(self) -> None:
        """A usage block as the API returns it (nulls, extra fields) is priced."""
        usage = {
            "input_tokens": 1200,
            "output_tokens": 350,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None,
            "server_tool_use": None,
            "service_tier": "batch",
        }
        expected = (1200 * 3.0 + 350 * 15.0) / MTOK / 2
        assert batch_cost("claude-sonnet-4-5-20250929", usage) == pytest.approx(expected)

    @pytest.mark.parametrize("bad", [-1, "12", True])
    def test_bad_count_is_named(self, bad: object) -> None:
        """A negative or non-numeric count is an error naming the usage field."""
        with pytest.raises(ValueError, match=r"usage\.output_tokens"):
            batch_cost("claude-haiku-4-5", {"input_tokens": 1, "output_tokens": bad})


class TestCostFunction:
    """The collector's per-row cost: batch_cost remembered per distinct usage."""

    USAGES = (
        {"input_tokens": 31, "output_tokens": 2},
        {"input_tokens": 31, "output_tokens": 3},
        {"input_tokens": 31, "output_tokens": 2, "cache_read_input_tokens": 9000},
        {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 800,
         "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 500}},
        {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 800,
         "cache_creation": {"ephemeral_5m_input_tokens": 800, "ephemeral_1h_input_tokens": 0}},
    )  # fmt: skip

    def test_same_as_batch_cost_on_every_call(self) -> None:
        """Repeated and interleaved usages and models cost exactly what batch_cost says."""
        table = PriceTable()
        cost = table.cost_function(lambda model: None)
        for _ in range(3):
            for model in ("claude-haiku-4-5", "claude-sonnet-4-5-20250929"):
                for usage in self.USAGES:
                    assert cost(model, usage) == table.batch_cost(model, usage), (model, usage)

    def test_unknown_model_reported_once(self) -> None:
        """on_unknown runs once per unknown model, never for a known one."""
        seen: list[str] = []
        cost = PriceTable().cost_function(seen.append)
        for usage in self.USAGES * 2:
            cost("claude-9", usage)
            cost("claude-haiku-4-5", usage)
        assert seen == ["claude-9"]

    def test_bad_counts_still_rejected(self) -> None:
        """The memo never turns a bad usage into a price: each is judged like batch_cost."""
        cost = PriceTable().cost_function(lambda model: None)
        cost("claude-haiku-4-5", {"input_tokens": 1, "output_tokens": 1})
        for bad in ({"input_tokens": -1}, {"input_tokens": "many"},
                    {"input_tokens": 1, "cache_creation": [1]}):
            with pytest.raises(ValueError, match="usage"):
                cost("claude-haiku-4-5", bad)


class TestOverrides:
    """Prices from the config's [prices."model"] tables."""

    def test_partial_override_of_known_model(self) -> None:
        """Overriding output only keeps the built-in input and cache prices."""
        price = PriceTable({"claude-haiku-4-5": {"output": 4.0}}).price("claude-haiku-4-5")
        assert (price.input, price.output, price.cache_write) == (1.0, 4.0, 1.25)

    def test_input_override_rederives_cache_prices(self) -> None:
        """A new input price moves the cache prices with it unless they are given."""
        price = PriceTable({"claude-haiku-4-5": {"input": 2.0}}).price("claude-haiku-4-5")
        assert (price.cache_write, price.cache_read) == (2.5, pytest.approx(0.2))

    def test_new_model_becomes_known(self) -> None:
        """A model the table lacks is added, dated ids included."""
        table = PriceTable({"claude-future-5": {"input": 2, "output": 10, "cache_read": 0.1}})
        price = table.price("claude-future-5-20270101")
        assert (price.input, price.output, price.cache_write, price.cache_read, price.known) == (
            2.0,
            10.0,
            2.5,
            0.1,
            True,
        )
        usage = {"input_tokens": MTOK, "output_tokens": 0}
        assert table.batch_cost("claude-future-5", usage) == pytest.approx(1.0)

    def test_new_model_needs_input_and_output(self) -> None:
        """Adding a model with only an output price names the model and what is missing."""
        with pytest.raises(ConfigError, match=r'batchd\.toml: \[prices\."claude-x"\].*input'):
            PriceTable({"claude-x": {"output": 5}}, source="/etc/batchd/batchd.toml")

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"inptu": 1.0}, "unknown key 'inptu'"),
            ({"input": -1}, "input must be a non-negative number"),
            ({"output": "15"}, "output must be a non-negative number"),
            ({"output": float("inf")}, "output must be finite"),
            (3.0, "must be a table"),
        ],
    )
    def test_bad_override_is_a_config_error(self, fields: object, message: str) -> None:
        """Typos, negatives, strings and non-tables are rejected with the key named."""
        with pytest.raises(ConfigError, match=message):
            PriceTable({"claude-haiku-4-5": fields})  # type: ignore[dict-item]

    def test_fallback_follows_overrides(self) -> None:
        """If an override makes a model dearer than Opus, unknown models use that price."""
        table = PriceTable({"claude-opus-4-1": {"output": 100.0}})
        assert table.price("mystery").output == 100.0


class TestEstimates:
    """Projections before anything is sent."""

    @pytest.mark.parametrize(("text", "tokens"), [("", 0), ("abcd", 1), ("abcde", 2)])
    def test_four_characters_per_token_rounded_up(self, text: str, tokens: int) -> None:
        """estimate_tokens is ceil(len/4)."""
        assert estimate_tokens(text) == tokens

    def test_request_text_is_counted(self) -> None:
        """System prompt and every text block of every message are summed."""
        params = {
            "model": "claude-haiku-4-5",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "x" * 40}],
            "messages": [
                {"role": "user", "content": "y" * 8},
                {"role": "user", "content": [{"type": "text", "text": "z" * 4}, {"type": "image"}]},
            ],
        }
        assert estimate_request_tokens(params) == 10 + 2 + 1

    def test_projected_cost_bounds(self) -> None:
        """Low pays the input only; high adds max_tokens of output, both at batch price."""
        low, high = projected_cost("claude-sonnet-4-5", input_tokens=MTOK, max_tokens=MTOK)
        assert (low, high) == (pytest.approx(1.5), pytest.approx(9.0))

    def test_projected_cost_rejects_negative(self) -> None:
        """A negative token count is a programming error, reported with the values."""
        with pytest.raises(ValueError, match="max_tokens=-1"):
            projected_cost("claude-haiku-4-5", 10, -1)
